"""Simulation settings: model, GPU, cost coefficients, scheduler, memory, arrivals.

Everything a run depends on is one :class:`SimConfig`; ``config.json`` in a run directory is
its :meth:`SimConfig.to_dict` (with the resolved block size and KV budget), and
:func:`memshare.sim.config_file.read_config` reads it back, checked field by field, so a run
can be repeated (and ``validate`` can set up the same run) without retyping a setting.

Presets are TOML files shipped in ``memshare/sim/presets`` (package data): ``gpus.toml``,
``models.toml`` and ``cost.toml``. A ``--gpu``/``--model-config`` value is a preset name or a
path to a TOML file holding one such table; every bad value is an
:class:`~memshare.errors.InputError` naming the option.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from memshare.errors import InputError
from memshare.limits import check_limit, check_tokens_per_block
from memshare.scheduler import SchedulerConfig as SchedulerConfig

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "float8": 1}
ArrivalMode = Literal["trace", "poisson", "closed"]
SEED_MAX = 2**64 - 1  # numpy reads a seed as unsigned 64-bit words: the largest one we take


# --------------------------------------------------------------------------- presets
def _preset_file(name: str) -> dict[str, Any]:
    text = (resources.files("memshare.sim") / "presets" / name).read_text(encoding="utf-8")
    return tomllib.loads(text)


def _load_table(value: str, preset_file: str, option: str) -> tuple[str, dict[str, Any]]:
    """(name, table) for a preset name or a TOML file path holding one table."""
    presets = _preset_file(preset_file)
    key = value.strip().lower()
    if key in presets:
        return key, dict(presets[key])
    path = Path(value)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise InputError(option, f"file {value!r} does not exist", "check the path")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InputError(option, f"{value} is not valid TOML ({e})", "fix the file") from None
        tables = {k: v for k, v in raw.items() if isinstance(v, dict)}
        if len(tables) == 1:
            ((name, table),) = tables.items()
            return name, dict(table)
        if tables:
            raise InputError(
                option, f"{value} holds {len(tables)} tables", "keep exactly one [name] table"
            )
        return path.stem, dict(raw)
    raise InputError(
        option,
        f"unknown preset {value!r}",
        f"choose one of: {', '.join(presets)}, or pass a .toml file",
    )


def _build(cls: type[Any], table: dict[str, Any], option: str, where: str) -> Any:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise InputError(
            option, f"{where}: unknown field(s) {', '.join(unknown)}", f"use: {', '.join(names)}"
        )
    try:
        obj = cls(**table)
    except TypeError as e:
        raise InputError(option, f"{where}: {e}", "add the missing fields") from None
    return obj


# --------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelConfig:
    """The served model, as the roofline and the KV budget see it (HF config names)."""

    name: str  # preset name (or the TOML file's table name)
    num_layers: int  # decoder layers (num_hidden_layers)
    hidden_size: int  # residual width
    num_heads: int  # query heads (num_attention_heads)
    num_kv_heads: int  # key/value heads (num_key_value_heads)
    head_dim: int  # dimension of one head
    intermediate_size: int  # MLP inner width (gated MLP: 3 matrices)
    vocab_size: int  # vocabulary (LM head rows)
    dtype: str = "bfloat16"  # weight and KV dtype
    tied_embeddings: bool = False  # LM head shares the embedding matrix
    hf_name: str = ""  # the HF repository id it describes (informational)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise InputError(
                "--model-config",
                f"{self.name}: dtype {self.dtype!r} is not known",
                f"use one of: {', '.join(DTYPE_BYTES)}",
            )
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InputError(
                    "--model-config", f"{self.name}: {name} must be a positive integer", "fix it"
                )

    @property
    def dtype_bytes(self) -> int:
        """Bytes per weight / KV element."""
        return DTYPE_BYTES[self.dtype]

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer (attention projections + gated MLP; norms ignored)."""
        h, q, kv = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        return h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size

    @property
    def linear_params(self) -> int:
        """Weights every token multiplies through: all decoder layers."""
        return self.num_layers * self.layer_params

    @property
    def lm_head_params(self) -> int:
        """LM head weights (applied to sampled positions only)."""
        return self.hidden_size * self.vocab_size

    @property
    def weight_bytes(self) -> int:
        """Weights resident on the device (decoder layers, LM head, embedding if untied)."""
        embed = 0 if self.tied_embeddings else self.hidden_size * self.vocab_size
        return (self.linear_params + self.lm_head_params + embed) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


def load_model(value: str) -> ModelConfig:
    """A model preset name or TOML path -> :class:`ModelConfig`."""
    name, table = _load_table(value, "models.toml", "--model-config")
    table.setdefault("name", name)
    return _build(ModelConfig, table, "--model-config", value)  # type: ignore[no-any-return]


def model_presets() -> list[str]:
    """Names of the shipped model presets."""
    return list(_preset_file("models.toml"))


def match_model_preset(trace_model_name: str) -> str | None:
    """The preset whose name or HF id matches a trace's model name, if any."""
    want = _norm(trace_model_name)
    for name, table in _preset_file("models.toml").items():
        hf = str(table.get("hf_name", ""))
        if want in (_norm(name), _norm(hf), _norm(hf.split("/")[-1])):
            return name
    return None


def _norm(name: str) -> str:
    """Lower case, without a GGUF quantisation suffix (``.Q4_1``, ``-f16``) or ``-instruct``."""
    name = re.sub(r"[.-](q\d\w*|i?q\d\w*|f16|f32|bf16|fp16)$", "", name.strip().lower())
    return re.sub(r"(-instruct|-chat)$", "", name)


# --------------------------------------------------------------------------- GPU
@dataclass(frozen=True)
class GpuSpec:
    """One accelerator's roofline ceilings."""

    name: str  # preset name
    peak_flops: float  # dense 16-bit FLOP/s
    mem_bandwidth: float  # device memory bytes/s
    memory: int  # device memory bytes
    description: str = ""  # human-readable model name

    def __post_init__(self) -> None:
        if not (self.peak_flops > 0 and self.mem_bandwidth > 0 and self.memory > 0):
            raise InputError("--gpu", f"{self.name}: ceilings must be positive", "fix the preset")


def load_gpu(value: str) -> GpuSpec:
    """A GPU preset name (h100, h200, a100-80g, l4, cpu) or TOML path -> :class:`GpuSpec`."""
    name, table = _load_table(value, "gpus.toml", "--gpu")
    table.setdefault("name", name)
    table["memory"] = int(table.get("memory", 0))
    return _build(GpuSpec, table, "--gpu", value)  # type: ignore[no-any-return]


def gpu_presets() -> list[str]:
    """Names of the shipped GPU presets."""
    return list(_preset_file("gpus.toml"))


# --------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class CostCoefficients:
    """Achieved fractions of the roofline ceilings and fixed overheads (fit by ``validate``)."""

    gemm_efficiency: float = 0.6  # fraction of peak FLOP/s in the linear layers
    attn_efficiency: float = 0.4  # fraction of peak FLOP/s in prefill attention
    bandwidth_efficiency: float = 0.8  # fraction of peak memory bandwidth
    step_overhead_s: float = 0.003  # fixed seconds per step
    seq_overhead_s: float = 2.0e-5  # seconds per scheduled sequence

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise InputError("--cost-model", f"{f.name} must be a number >= 0", "fix it")
        for name in ("gemm_efficiency", "attn_efficiency", "bandwidth_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise InputError("--cost-model", f"{name} must lie in (0, 1]", "fix it")


def load_cost(path: str | None) -> CostCoefficients:
    """Default coefficients (``presets/cost.toml``), overridden by a ``--cost-model`` file."""
    base = dict(_preset_file("cost.toml")["coefficients"])
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError("--cost-model", f"file {path!r} does not exist", "check the path")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InputError("--cost-model", f"{path} is not valid TOML ({e})", "fix it") from None
        table = raw.get("coefficients", raw)
        if not isinstance(table, dict):
            raise InputError("--cost-model", f"{path}: [coefficients] is not a table", "fix it")
        base.update(table)
    return _build(CostCoefficients, base, "--cost-model", path or "cost.toml")  # type: ignore[no-any-return]


def cost_toml(coef: CostCoefficients, comment: str = "") -> str:
    """``coef`` as a ``--cost-model`` file (what ``validate`` writes after fitting)."""
    lines = [f"# {line}" for line in comment.splitlines()] + ["[coefficients]"]
    lines += [f"{f.name} = {float(getattr(coef, f.name))!r}" for f in fields(coef)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class KVBudget:
    """The KV cache size as the user asked for it; resolved to blocks per workload.

    Exactly one way applies, in this order: ``unlimited``, ``blocks``, ``bytes``, else the
    GPU's memory times ``gpu_memory_utilization`` minus the weights (as vLLM sizes it).
    """

    blocks: int | None = None  # --kv-blocks N
    bytes: int | None = None  # --kv-bytes SIZE
    unlimited: bool = False  # --kv-blocks unlimited: enough that nothing is ever evicted
    gpu_memory_utilization: float = 0.9  # share of device memory for weights + KV

    def describe(self) -> str:
        """How the budget was set, in words."""
        if self.unlimited:
            return "unlimited"
        if self.blocks is not None:
            return f"{self.blocks} blocks"
        if self.bytes is not None:
            return f"{self.bytes} bytes"
        return f"{self.gpu_memory_utilization:g} of GPU memory minus weights"


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tib": 2**40,
}


def parse_bytes(text: str, option: str = "--kv-bytes") -> int:
    """``40GiB``, ``512MB``, ``1.5e9`` -> bytes (binary units KiB..TiB, decimal KB..TB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise InputError(
            option,
            f"{text!r} is not a size",
            "write a number with an optional unit, e.g. 40GiB, 512MiB, 8GB or 1e9",
        )
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value):
        problem = f"{text!r} is too large: not a finite number of bytes"
        raise InputError(option, problem, "give a size > 0 a float can hold, e.g. 40GiB")
    if value <= 0:
        raise InputError(option, f"{text!r} is zero", "give a size > 0, e.g. 40GiB")
    return int(value)


def parse_kv_blocks(text: str) -> tuple[int | None, bool]:
    """``--kv-blocks`` value -> (blocks, unlimited)."""
    if text.strip().lower() in ("unlimited", "inf", "infinite"):
        return None, True
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n <= 0:
        raise InputError(
            "--kv-blocks", f"{text!r} is not a positive integer", "e.g. 20000, or 'unlimited'"
        )
    return n, False


# --------------------------------------------------------------------------- arrivals
@dataclass(frozen=True)
class ArrivalSpec:
    """How requests arrive: trace timestamps, Poisson at ``rate``, or ``clients`` closed loop."""

    mode: ArrivalMode = "trace"  # trace | poisson | closed
    rate: float | None = None  # poisson: requests per second
    clients: int | None = None  # closed: concurrent clients, each sends its next on completion

    def __str__(self) -> str:
        if self.mode == "poisson":
            return f"poisson:{self.rate:g}"
        if self.mode == "closed":
            return f"closed:{self.clients}"
        return "trace"


def parse_arrival(text: str) -> ArrivalSpec:
    """``trace`` | ``poisson:RATE`` | ``closed:N`` -> :class:`ArrivalSpec`."""
    fix = "use trace, poisson:RATE (requests/s, e.g. poisson:2.0) or closed:N (N clients)"
    head, _, arg = text.strip().partition(":")
    head = head.lower()
    if head == "trace" and not arg:
        return ArrivalSpec()
    if head == "poisson":
        try:
            rate = float(arg)
        except ValueError:
            rate = -1.0
        if not (math.isfinite(rate) and rate > 0):
            raise InputError("--arrival", f"{text!r}: rate must be a number > 0", fix)
        return ArrivalSpec("poisson", rate=rate)
    if head == "closed":
        try:
            n = int(arg)
        except ValueError:
            n = -1
        if n <= 0:
            raise InputError("--arrival", f"{text!r}: clients must be an integer > 0", fix)
        return ArrivalSpec("closed", clients=n)
    raise InputError("--arrival", f"{text!r} is not an arrival mode", fix)


# --------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class SimConfig:
    """Everything one simulation run depends on (with the trace's contents)."""

    trace: str  # trace directory (absolute path)
    policy: str = "prefix"  # registered policy name
    policy_params: dict[str, Any] = field(default_factory=dict)  # --set key=value for it
    model: ModelConfig = field(default_factory=lambda: load_model("llama-3.1-8b"))
    gpu: GpuSpec = field(default_factory=lambda: load_gpu("h100"))
    cost: CostCoefficients = field(default_factory=lambda: load_cost(None))
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv: KVBudget = field(default_factory=KVBudget)
    block_size: int | None = None  # tokens per block; None: the trace's (Mooncake: 512)
    arrival: ArrivalSpec = field(default_factory=ArrivalSpec)
    limit: int | None = None  # simulate only the first N requests (trace order)
    time_scale: float = 1.0  # trace mode: multiply trace inter-arrival times by this
    seed: int = 0  # seeds the arrival generator (Poisson)
    check_invariants: bool = False  # run BlockPool.check after every step (slow; for tests)

    def __post_init__(self) -> None:
        """The run's numbers in range (the one check of each, for options and config.json);
        the scheduler's are checked by :class:`SchedulerConfig`, the budget's by its parsers."""
        check_limit(self.limit)
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            problem = f"must be a finite number > 0, got {self.time_scale}"
            raise InputError("--time-scale", problem, "e.g. 0.5, or 1 for the trace's times")
        if self.block_size is not None:
            check_tokens_per_block(self.block_size)
        util = self.kv.gpu_memory_utilization
        if not 0 < util <= 1:  # NaN fails too
            raise InputError(
                "--gpu-memory-utilization", f"must lie in (0, 1], got {util}", "e.g. 0.9"
            )
        if not 0 <= self.seed <= SEED_MAX:
            problem = f"must be 0..{SEED_MAX:,}, got {self.seed:,}"
            raise InputError("--seed", problem, "e.g. 0 (numpy seeds are unsigned 64-bit)")

    def with_(self, **changes: Any) -> SimConfig:
        """A copy with some fields replaced."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, field order fixed."""
        return asdict(self)
