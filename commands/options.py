"""The command line's options, each declared once: the shared aliases (model, device, dtype,
threads, limit, block size, output, ``--json``, policy, ``--set``), ``SimArgs`` and
:func:`spread`, which lets a command take a dataclass of options as one parameter.

An option whose help says what it means for one command (``-o``, ``--limit``,
``--block-size``) is built by a small factory here, so its flag, type and check are still
written once. Output paths are checked before any work (:func:`check_out`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from memshare.limits import check_limit, check_tokens_per_block
from memshare.outdir import check_out

if TYPE_CHECKING:
    from collections.abc import Callable

    from memshare.sim.options import SimOptions

MODEL_HELP = "Local HF model folder or .gguf file (default: SmolLM2-135M-Instruct)."
NO_POLICY_NOTICE = "memshare: no --policy given: ran prefix, the default"


# ------------------------------------------------------------------------------ output paths
def out_dir(param: typer.CallbackParam, path: Path | None) -> Path | None:
    """Callback of options that name a folder to write (``-o``)."""
    if path is not None:
        check_out(path, min(param.opts, key=len), folder=True)
    return path


def out_file(param: typer.CallbackParam, path: Path | None) -> Path | None:
    """Callback of options that name one file to write (``calibrate -o``, ``--plot``)."""
    if path is not None:
        check_out(path, min(param.opts, key=len), folder=False)
    return path


def output_option(help: str, *, file: bool = False) -> Any:
    """``-o/--output``: the folder (or, with ``file``, the one file) a command writes."""
    return typer.Option("-o", "--output", help=help, callback=out_file if file else out_dir)


def limit_callback(_param: typer.CallbackParam, value: int | None) -> int | None:
    """``--limit``'s callback: :func:`memshare.limits.check_limit`, the rule of every command."""
    check_limit(value)
    return value


def block_size_callback(_param: typer.CallbackParam, value: int | None) -> int | None:
    """``--block-size``'s callback: :func:`memshare.limits.check_tokens_per_block`."""
    if value is not None:
        check_tokens_per_block(value)
    return value


def limit_option(help: str) -> Any:
    """``--limit N``: only the first N items the command reads (``help`` names them)."""
    return typer.Option("--limit", help=help, callback=limit_callback)


def block_size_option(help: str) -> Any:
    """``--block-size``: tokens per KV block (``help`` says whose default applies)."""
    return typer.Option("--block-size", help=help, callback=block_size_callback)


# ---------------------------------------------------------------- options several commands take
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help=MODEL_HELP)]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 | bfloat16 | float16.")]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads", help="Torch CPU threads (default: $OMP_NUM_THREADS, else one per core)."
    ),
]
BlockSizeOpt = Annotated[int, block_size_option("Tokens per KV block.")]
TraceBlockSizeOpt = Annotated[
    int | None, block_size_option("Tokens per block (default: the trace's).")
]
RequestsLimitOpt = Annotated[int | None, limit_option("Only the first N requests.")]
PolicyOpt = Annotated[str, typer.Option("--policy", help="Policy (see `memshare policies`).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Policy parameter key=value (repeat).")
]
PlotOpt = Annotated[bool, typer.Option("--plot", help="Write PNG figures beside the runs.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an earlier run of this command in -o whole.")
]
StepTokensOpt = Annotated[int, typer.Option(help="Token budget per step.")]
MaxSeqsOpt = Annotated[int, typer.Option(help="Running requests at most.")]

# ------------------------------------------------------------------ the simulator's (SimArgs)
TraceArg = Annotated[Path, typer.Argument(metavar="TRACE", help="A trace directory.")]
PoliciesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--policy",
        help="Policy to run (default: prefix; repeat to compare; see `memshare policies`).",
    ),
]
SimSetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Policy parameter key=value, or POLICY.key=value (repeat)."),
]
KvBlocksOpt = Annotated[
    str | None,
    typer.Option(
        "--kv-blocks", help="KV budget in blocks, or 'unlimited' (also 'inf': never evicts)."
    ),
]
KvBytesOpt = Annotated[
    str | None, typer.Option("--kv-bytes", help="KV budget in bytes, e.g. 40GiB (model's blocks).")
]
GpuUtilOpt = Annotated[
    float,
    typer.Option(help="Without --kv-blocks/--kv-bytes: GPU memory share for weights + KV."),
]
GpuOpt = Annotated[str, typer.Option(help="GPU preset (h100, h200, a100-80g, l4, cpu) or TOML.")]
ModelConfigOpt = Annotated[
    str | None,
    typer.Option(help="Model preset or TOML (default: the trace's model, else llama-3.1-8b)."),
]
FidelityModelOpt = Annotated[
    Path | None,
    typer.Option(
        help="Fidelity model file (memshare tune, validate --fit-fidelity-model): also "
        "predict each run's top-1 agreement and KL against no sharing."
    ),
]
CostOpt = Annotated[
    str | None, typer.Option("--cost-model", help="TOML of cost coefficients (from validate).")
]
ArrivalOpt = Annotated[
    str, typer.Option(help="trace (timestamps) | poisson:RATE | closed:CLIENTS.")
]
SimLimitOpt = Annotated[int | None, limit_option("Simulate only the first N requests.")]
TimeScaleOpt = Annotated[
    float, typer.Option(help="Multiply trace inter-arrival times by this (trace arrivals).")
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the arrival generator.")]
ChunkedOpt = Annotated[bool, typer.Option(help="Split long prompts over steps.")]
ReserveOpt = Annotated[
    bool,
    typer.Option(help="Admit a request only if its whole prompt fits (vLLM 0.32's default)."),
]
LongPrefillOpt = Annotated[int, typer.Option(help="Cap one request's prefill chunk (0: no cap).")]


@dataclasses.dataclass(frozen=True)
class SimArgs:
    """``simulate``'s options, each defined here once (type, flag, help, default); a command
    given ``args: SimArgs`` under :func:`spread` takes every field as a parameter.

    Field names are :class:`~memshare.sim.options.SimOptions`' (``--policy`` fills
    ``policies``, ``--set`` fills ``sets``), so :meth:`options` passes each one by name."""

    trace: TraceArg
    policies: PoliciesOpt = None
    sets: SimSetOpt = None
    kv_blocks: KvBlocksOpt = None
    kv_bytes: KvBytesOpt = None
    gpu_memory_utilization: GpuUtilOpt = 0.9
    block_size: TraceBlockSizeOpt = None
    gpu: GpuOpt = "h100"
    model_config: ModelConfigOpt = None
    cost_model: CostOpt = None
    arrival: ArrivalOpt = "trace"
    limit: SimLimitOpt = None
    time_scale: TimeScaleOpt = 1.0
    seed: SeedOpt = 0
    max_num_batched_tokens: StepTokensOpt = 8192
    max_num_seqs: MaxSeqsOpt = 256
    chunked_prefill: ChunkedOpt = True
    long_prefill_threshold: LongPrefillOpt = 0
    reserve_full_prompt: ReserveOpt = True
    fidelity_model: FidelityModelOpt = None

    def options(self) -> SimOptions:
        """The raw :class:`SimOptions` (checked by ``build_configs``); the CLI's one builder."""
        from memshare.sim.options import SimOptions

        raw = fields_of(self)
        raw["policies"] = tuple(self.policies or ("prefix",))
        raw["sets"] = tuple(self.sets or ())
        return SimOptions(**raw)

    @property
    def notice(self) -> str | None:
        """What to tell a user who named no policy."""
        return None if self.policies else NO_POLICY_NOTICE


def fields_of(args: Any) -> dict[str, Any]:
    """An options dataclass as keyword arguments, field by field (its library twin's names)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}


def spread(command: Callable[..., None]) -> Callable[..., None]:
    """``command`` with each parameter typed by an options dataclass (``args: SimArgs``)
    spread into one parameter per field.

    Typer reads a command's parameters from ``inspect.signature``, which honours
    ``__signature__``: the fields go there, in that parameter's place (so ``--help`` keeps
    their order), and each call packs them back into one instance. A parameter named like a
    field is a TypeError (two options would claim one flag)."""
    hints = typing.get_type_hints(command, include_extras=True)
    packs: dict[str, tuple[type[Any], list[str]]] = {}
    params: list[inspect.Parameter] = []
    for p in inspect.signature(command).parameters.values():
        hint = hints[p.name]
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            params.append(p.replace(kind=p.KEYWORD_ONLY, annotation=hint))
            continue
        shared = typing.get_type_hints(hint, include_extras=True)
        fields = dataclasses.fields(hint)
        packs[p.name] = (hint, [f.name for f in fields])
        for f in fields:
            default = p.empty if f.default is dataclasses.MISSING else f.default
            hint = shared[f.name]
            params.append(
                inspect.Parameter(f.name, p.KEYWORD_ONLY, annotation=hint, default=default)
            )
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise TypeError(f"{command.__name__}: parameters {twice} are also options fields")

    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        for name, (kind, fields) in packs.items():
            kwargs[name] = kind(**{field: kwargs.pop(field) for field in fields})
        command(**kwargs)

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return run
