"""``memshare simulate`` options as typed -> checked :class:`SimConfig` objects.

The CLI hands over raw values (:class:`SimOptions`); everything is checked here, and every
bad value is an :class:`~memshare.errors.InputError` naming the option and the fix. Sweeps
(:func:`parse_sweep`) name one of these options and give its values as the user would type
them, so a sweep value goes through exactly the same checks as the option; a message about a
swept value names the sweep as the user typed it (``--sweep ...`` or ``KEY=A,B,C ...``), and an
option the sweep would silently override is refused (:func:`check_sweep`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from memshare.errors import InputError
from memshare.registry import (
    coerce_params,
    make_policy,
    param_defaults,
    parse_settings,
    policy_names,
)
from memshare.sim.config import (
    KVBudget,
    ModelConfig,
    SchedulerConfig,
    SimConfig,
    load_cost,
    load_gpu,
    load_model,
    match_model_preset,
    parse_arrival,
    parse_bytes,
    parse_kv_blocks,
)
from memshare.traces.reader import load_manifest
from memshare.traces.schema import Manifest

DEFAULT_WORKLOAD_MODEL = "llama-3.1-8b"  # for traces that name no model (imported workloads)


@dataclass(frozen=True)
class SimOptions:
    """Raw ``simulate`` options (as typed); :func:`build_configs` checks them.

    The command line declares each field once, under the same name, in ``SimArgs``
    (``memshare.commands.options``: flag, help, CLI default); ``simulate`` and ``sweep`` both
    take those."""

    trace: Path  # trace directory
    policies: tuple[str, ...] = ("prefix",)  # --policy (repeatable)
    sets: tuple[str, ...] = ()  # --set key=value or policy.key=value
    kv_blocks: str | None = None  # --kv-blocks N | unlimited
    kv_bytes: str | None = None  # --kv-bytes SIZE (e.g. 40GiB)
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights + KV (default budget)
    block_size: int | None = None  # --block-size (default: the trace's)
    gpu: str = "h100"  # --gpu preset or TOML file
    model_config: str | None = None  # --model-config preset or TOML file
    cost_model: str | None = None  # --cost-model TOML file (coefficients)
    arrival: str = "trace"  # --arrival trace | poisson:R | closed:N
    limit: int | None = None  # --limit N requests
    time_scale: float = 1.0  # --time-scale (trace arrivals)
    seed: int = 0  # --seed
    max_num_batched_tokens: int = 8192  # --max-num-batched-tokens
    max_num_seqs: int = 256  # --max-num-seqs
    chunked_prefill: bool = True  # --chunked-prefill / --no-chunked-prefill
    long_prefill_threshold: int = 0  # --long-prefill-threshold (0: off)
    reserve_full_prompt: bool = True  # --reserve-full-prompt / --no-reserve-full-prompt
    fidelity_model: Path | None = None  # --fidelity-model FILE: predict each run's fidelity


def policy_params(
    policies: tuple[str, ...], sets: tuple[str, ...], where: str = "--set"
) -> list[dict[str, Any]]:
    """Each policy's ``--set`` parameters, typed by :func:`memshare.registry.coerce_params`.

    ``key=value`` goes to every given policy that has a parameter ``key`` (an error if none
    has); ``policy.key=value`` only to that policy, or to the compositions that hold it as a
    member (``cf-topk.tau`` under ``prefix+cf-topk``). Errors name ``where`` (a sweep's values
    are checked here too, named as the user typed the sweep).
    """
    raw = parse_settings(list(sets), where)
    per: list[dict[str, Any]] = [{} for _ in policies]
    known = [param_defaults(p) for p in policies]
    for key, value in raw.items():
        scope, dot, name = key.rpartition(".")
        runs = [p for p in policies if scope in (p, *p.split("+"))]  # a policy or a member
        if dot and not runs:
            raise InputError(
                where, f"{key!r} names policy {scope!r}, which is not run", "check --policy"
            )
        targets = [
            i
            for i, p in enumerate(policies)
            if (p in runs if dot else name in known[i] or len(policies) == 1)
        ]
        if not targets:
            raise InputError(
                where,
                f"no given policy has a parameter {name!r}",
                "see the policy's parameters, or scope it as POLICY.KEY=VALUE",
            )
        for i in targets:  # a member's scope stays for coerce_params: that member only
            per[i][key if dot and scope != policies[i] else name] = value
    return [coerce_params(p, params, where) for p, params in zip(policies, per, strict=True)]


def default_model(manifest: Manifest) -> ModelConfig:
    """The model a trace implies: its own (by preset), or the workload default."""
    if manifest.model is None:
        return load_model(DEFAULT_WORKLOAD_MODEL)
    preset = match_model_preset(manifest.model.name)
    if preset is None:
        raise InputError(
            "--model-config",
            f"the trace's model {manifest.model.name!r} matches no preset",
            "pass --model-config NAME or a TOML file with its config",
        )
    return load_model(preset)


def build_configs(opts: SimOptions, manifest: Manifest | None = None) -> list[SimConfig]:
    """One checked :class:`SimConfig` per ``--policy`` (InputError on any bad value)."""
    if manifest is None:
        manifest = load_manifest(Path(opts.trace))
    if not opts.policies:
        raise InputError("--policy", "no policy given", f"use one of: {', '.join(policy_names())}")
    if len(set(opts.policies)) != len(opts.policies):
        raise InputError("--policy", "a policy is given twice", "give each policy once")
    if opts.kv_blocks is not None and opts.kv_bytes is not None:
        raise InputError("--kv-bytes", "given together with --kv-blocks", "set only one of them")
    blocks, unlimited = parse_kv_blocks(opts.kv_blocks) if opts.kv_blocks else (None, False)
    kv = KVBudget(
        blocks=blocks,
        bytes=parse_bytes(opts.kv_bytes) if opts.kv_bytes else None,
        unlimited=unlimited,
        gpu_memory_utilization=opts.gpu_memory_utilization,
    )
    model = load_model(opts.model_config) if opts.model_config else default_model(manifest)
    arrival = parse_arrival(opts.arrival)
    requests = manifest.counts.requests
    if opts.limit is not None and opts.limit > 0:
        requests = min(requests, opts.limit)
    if arrival.clients is not None and arrival.clients > max(requests, 1):
        # cost must follow the work: a client per request at most (each is a process)
        raise InputError(
            "--arrival",
            f"closed:{arrival.clients} has more clients than the {requests} requests to run",
            f"use at most closed:{max(requests, 1)}",
        )
    base = SimConfig(
        trace=str(Path(opts.trace).resolve()),
        model=model,
        gpu=load_gpu(opts.gpu),
        cost=load_cost(opts.cost_model),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=opts.max_num_batched_tokens,
            max_num_seqs=opts.max_num_seqs,
            enable_chunked_prefill=opts.chunked_prefill,
            long_prefill_token_threshold=opts.long_prefill_threshold,
            reserve_full_prompt=opts.reserve_full_prompt,
        ),
        kv=kv,
        block_size=opts.block_size,
        arrival=arrival,
        limit=opts.limit,
        time_scale=opts.time_scale,
        seed=opts.seed,
    )
    for name in opts.policies:
        param_defaults(name)  # unknown names fail here, before any run (no policy is built:
        # a policy may need parameters, e.g. kvsharer's layer_map_file)
    configs = []
    for name, params in zip(opts.policies, policy_params(opts.policies, opts.sets), strict=True):
        make_policy(name, **params)  # bad parameter values fail here too
        configs.append(replace(base, policy=name, policy_params=params))
    return configs


# --------------------------------------------------------------------------- sweeps
SWEEP_KEYS: dict[str, type] = {
    "kv_blocks": str,
    "kv_bytes": str,
    "gpu_memory_utilization": float,
    "block_size": int,
    "gpu": str,
    "model_config": str,
    "arrival": str,
    "limit": int,
    "time_scale": float,
    "seed": int,
    "max_num_batched_tokens": int,
    "max_num_seqs": int,
    "long_prefill_threshold": int,
}


@dataclass(frozen=True)
class SweepSpec:
    """One option over several values, and how the user typed it (named by every message)."""

    key: str  # a SimOptions field name (SWEEP_KEYS), or a policy parameter
    values: tuple[Any, ...]  # typed values, in the order given (policy parameters: text)
    policy_param: bool = False  # ``key`` is a policy parameter (passed as --set key=value)
    arg: str = "--sweep"  # what the sweep was typed as: ``--sweep`` or ``KEY=A,B,C``
    text: str = ""  # the sweep as typed (``tau=0.1,0.2``)

    @property
    def where(self) -> str:
        """The sweep as the user typed it, for messages: ``--sweep tau=0.1,0.2``."""
        return f"{self.arg} {self.text}".strip()

    @property
    def flag(self) -> str:
        """The option the swept values stand for: ``--kv-blocks`` (policy parameters:
        ``--set``)."""
        return "--set" if self.policy_param else "--" + self.key.replace("_", "-")

    def label(self, value: Any) -> str:
        """A directory-safe ``key=value`` name for one point."""
        return re.sub(r"[^A-Za-z0-9_.=+-]", "_", f"{self.key}={value}")

    def refused(self, value: Any, e: InputError) -> InputError:
        """``e``, raised by the option a swept value stands for, as an error of the sweep."""
        return InputError(self.where, f"{self.key}={value}: {e.where} {e.problem}", e.fix)


def parse_sweep(text: str, arg: str = "--sweep") -> SweepSpec:
    """``key=a,b,c`` -> :class:`SweepSpec` (dashes or underscores in an option's key).

    ``arg`` is what the user typed the sweep as (``--sweep``, or ``KEY=A,B,C`` for ``memshare
    sweep``); every message names it with the text. Refused: no ``=``, fewer than 2 values,
    an empty value (``a,,b``), a repeated value, a value an option's type does not take."""
    where = f"{arg} {text}"
    name, eq, raw = text.partition("=")
    key = name.strip().replace("-", "_").lstrip("_")
    if key not in SWEEP_KEYS:
        key = name.strip()  # a policy parameter, maybe scoped: cf-topk.tau
    fix = f"use key=a,b,c with key one of: {', '.join(SWEEP_KEYS)}, or a policy parameter"
    if not eq:
        raise InputError(where, f"{text!r} is not key=a,b,c", fix)
    items = [v.strip() for v in raw.split(",")]
    if not raw.strip():
        raise InputError(where, f"{key} is given no values", f"give 2 or more, e.g. {key}=1,2")
    if "" in items:
        n = items.index("") + 1
        problem = f"value {n} of {len(items)} is empty"
        raise InputError(where, problem, "give a value between every two commas, e.g. a,b,c")
    if len(items) < 2:
        raise InputError(where, f"{text!r} gives fewer than 2 values", fix)
    if key not in SWEEP_KEYS:  # a policy parameter: checked against the policies by sweep
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.+-]*", key):
            raise InputError(where, f"unknown sweep key {key!r}", fix)
        values: tuple[Any, ...] = tuple(items)
    else:
        kind = SWEEP_KEYS[key]
        try:
            values = tuple(kind(v) for v in items)
        except ValueError:
            problem = f"{key} takes {kind.__name__} values, got {raw!r}"
            raise InputError(where, problem, fix) from None
    if len(set(values)) != len(values):
        raise InputError(where, f"{text!r} repeats a value", "give each value once")
    return SweepSpec(key, values, key not in SWEEP_KEYS, arg, text)


def check_sweep(opts: SimOptions, spec: SweepSpec) -> None:
    """Refuse an option the sweep would silently override: the swept option (or, for
    ``kv_blocks``/``kv_bytes``, the other budget) given away from its default, or a ``--set``
    of the swept policy parameter; then each swept policy parameter value on its own."""
    if spec.policy_param:
        for item in opts.sets:
            if _same_param(item.partition("=")[0].strip(), spec.key):
                problem = f"sets {spec.key}, which {spec.where} sweeps"
                raise InputError(f"--set {item}", problem, "give the value in one of them")
        scope, _, name = spec.key.rpartition(".")
        known = [p for p in opts.policies if name in param_defaults(p) and scope in ("", p)]
        if not known and scope in ("", *opts.policies):
            raise InputError(
                spec.where,
                f"unknown sweep key {spec.key!r}: not a simulate option, and no --policy "
                f"({', '.join(opts.policies)}) has a parameter {name!r}",
                f"use one of: {', '.join(SWEEP_KEYS)}, or a parameter of the policy",
            )
        for value in spec.values:
            policy_params(opts.policies, (f"{spec.key}={value}",), where=spec.where)
        return
    defaults = SimOptions(trace=opts.trace)
    budget = {"kv_blocks": "kv_bytes", "kv_bytes": "kv_blocks"}
    for key in (spec.key, budget.get(spec.key)):
        if key is not None and getattr(opts, key) != getattr(defaults, key):
            flag = "--" + key.replace("_", "-")
            problem = f"is given with {spec.where}, which sets the KV budget itself"
            if key == spec.key:
                problem = f"is given with {spec.where}, which sets {key} itself"
            raise InputError(f"{flag} {getattr(opts, key)}", problem, f"drop {flag} or the sweep")
    _check_sweep_applies(opts, spec)


def _check_sweep_applies(opts: SimOptions, spec: SweepSpec) -> None:
    """Refuse a sweep of an option the other options leave without effect: every point
    would be the same run."""
    mode = opts.arrival.partition(":")[0].strip()
    idle = {
        "seed": (mode != "poisson", f"--arrival {opts.arrival} draws nothing at random"),
        "time_scale": (mode != "trace", f"--arrival {opts.arrival} does not use trace times"),
        "gpu_memory_utilization": (
            opts.kv_blocks is not None or opts.kv_bytes is not None,
            "--kv-blocks/--kv-bytes set the KV budget",
        ),
    }
    unused, why = idle.get(spec.key, (False, ""))
    if unused:
        raise InputError(
            spec.where,
            f"{spec.key} has no effect here ({why}): every point would be the same run",
            "sweep an option that changes the run",
        )


def _same_param(a: str, b: str) -> bool:
    """``a`` and ``b`` (``tau``, ``cf-topk.tau``) name one parameter of one policy."""
    scope_a, _, name_a = a.rpartition(".")
    scope_b, _, name_b = b.rpartition(".")
    return name_a == name_b and (not scope_a or not scope_b or scope_a == scope_b)


def sweep_options(opts: SimOptions, spec: SweepSpec, value: Any) -> SimOptions:
    """``opts`` with the swept option set to ``value`` (kv_blocks/kv_bytes exclude the other;
    a policy parameter is added to the ``--set`` items)."""
    if spec.policy_param:
        return replace(opts, sets=(*opts.sets, f"{spec.key}={value}"))
    changes: dict[str, Any] = {spec.key: value}
    if spec.key == "kv_blocks":
        changes["kv_bytes"] = None
    elif spec.key == "kv_bytes":
        changes["kv_blocks"] = None
    return replace(opts, **changes)


assert set(SWEEP_KEYS) <= {f.name for f in fields(SimOptions)}
