"""Step time from a roofline over the model config and a GPU preset.

One scheduler step runs every scheduled token through the model once. Its time is a sum of
roofline terms, each ``max(FLOPs / achieved FLOP/s, bytes / achieved bytes/s)``:

- **linear**: all decoder-layer weights times every scheduled token, plus the LM head for the
  sampled positions; the weights are read once per step. Small batches are bandwidth-bound
  (decode), large ones compute-bound (prefill).
- **prefill attention** (sequences computing more than one token): a chunk of ``n`` new
  tokens after ``c`` cached ones does ``n * (c + (n + 1) / 2)`` query-key pairs (causal), and
  reads the ``c + n`` tokens' K and V.
- **decode attention** (sequences computing one token): reads all ``c + 1`` tokens' K and V;
  memory-bound, growing with context.

plus fixed overheads per step and per sequence. Coefficients (achieved fractions of peak and
the overheads) come from :class:`~memshare.sim.config.CostCoefficients`, which ``validate``
can fit from measurements.

Invariant: the time depends only on the :class:`BatchShape` aggregates, so a step costs O(1)
here whatever its batch size; it is positive for any non-empty batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from memshare.scheduler import StepPlan
from memshare.sim.config import CostCoefficients, GpuSpec, ModelConfig


@dataclass(slots=True)
class BatchShape:
    """What one step computes, in aggregates the roofline needs (:func:`plan_shape`)."""

    num_seqs: int = 0  # scheduled sequences
    num_tokens: int = 0  # scheduled tokens in all
    num_sampled: int = 0  # sequences that sample a token at the end of the step
    prefill_seqs: int = 0  # sequences computing > 1 token
    prefill_tokens: int = 0  # their tokens
    prefill_pairs: float = 0.0  # sum over them of n * (c + (n + 1) / 2): query-key pairs
    prefill_kv_tokens: int = 0  # sum over them of c + n: context tokens whose KV is read
    decode_seqs: int = 0  # sequences computing exactly one token
    decode_kv_tokens: int = 0  # sum over them of c + 1

    def add(self, n: int, c: int, sampled: bool, decode: bool) -> None:
        """Count one sequence computing ``n`` tokens after ``c`` cached/computed ones; a
        ``decode`` sequence computes exactly one token (the scheduler decides: a token whose
        KV is copied rather than computed still makes its chunk a prefill)."""
        self.num_seqs += 1
        self.num_tokens += n
        self.num_sampled += sampled
        if decode:
            self.decode_seqs += 1
            self.decode_kv_tokens += c + 1
        else:
            self.prefill_seqs += 1
            self.prefill_tokens += n
            self.prefill_pairs += n * (c + (n + 1) / 2)
            self.prefill_kv_tokens += c + n


def plan_shape(plan: StepPlan) -> BatchShape:
    """The batch shape of a scheduler step: tokens whose KV a policy copies (KVShare's
    ``reused``) take no compute and count as context; a chunk of one computed token is a
    decode."""
    shape = BatchShape()
    for c in plan.chunks:
        shape.add(
            c.num_tokens - c.reused,
            c.start + c.reused,
            c.samples,
            c.num_tokens == 1 and not c.reused,
        )
    return shape


@dataclass(frozen=True)
class StepCost:
    """A step's time split by term (seconds)."""

    linear_s: float  # decoder layers + LM head
    prefill_attn_s: float  # attention of multi-token chunks
    decode_attn_s: float  # attention of one-token sequences
    overhead_s: float  # fixed + per-sequence overheads

    @property
    def total_s(self) -> float:
        """The step's duration."""
        return self.linear_s + self.prefill_attn_s + self.decode_attn_s + self.overhead_s


class CostModel:
    """Roofline step time for one (model, GPU, coefficients); see the module docstring."""

    def __init__(self, model: ModelConfig, gpu: GpuSpec, coef: CostCoefficients) -> None:
        self.model, self.gpu, self.coef = model, gpu, coef
        flops = gpu.peak_flops
        self._gemm_flops = flops * coef.gemm_efficiency  # achieved FLOP/s, linear layers
        self._attn_flops = flops * coef.attn_efficiency  # achieved FLOP/s, prefill attention
        self._bw = gpu.mem_bandwidth * coef.bandwidth_efficiency  # achieved bytes/s
        m = model
        self._lin_flops_tok = 2.0 * m.linear_params  # FLOPs per token through the layers
        self._head_flops_tok = 2.0 * m.lm_head_params  # FLOPs per sampled position
        self._weight_read = float((m.linear_params + m.lm_head_params) * m.dtype_bytes)
        # QK^T and PV: 2 matmuls x 2 FLOPs per multiply-add, per head and head dim, all layers
        self._pair_flops = 4.0 * m.num_layers * m.num_heads * m.head_dim
        self._kv_tok = float(m.kv_bytes_per_token)  # bytes of K+V per token, all layers
        self._step_s = coef.step_overhead_s
        self._seq_s = coef.seq_overhead_s
        self._decode_fixed: dict[int, tuple[float, float]] = {}  # r -> (linear + 0.0, overhead)

    def step_time(self, b: BatchShape) -> float:
        """Seconds one step with batch ``b`` takes."""
        linear, pre, dec, over = self._terms(b)
        return linear + pre + dec + over

    def decode_time(self, r: int, kv: int) -> float:
        """:meth:`step_time` of a step in which ``r`` sequences decode one token each, all
        sampled, with ``kv`` context tokens in all (``BatchShape(r, r, r, decode_seqs=r,
        decode_kv_tokens=kv)``): the same operations in the same order, so the same float;
        the terms that depend on ``r`` alone are kept per ``r``."""
        fixed = self._decode_fixed.get(r)
        if fixed is None:
            lin, _, _, over = self._terms(BatchShape(r, r, r))
            fixed = self._decode_fixed[r] = (lin + 0.0, over)
        bw = self._bw
        dec = max(self._pair_flops * kv / self._attn_flops, self._kv_tok * kv / bw)
        return fixed[0] + dec + fixed[1]

    def breakdown(self, b: BatchShape) -> StepCost:
        """The same time split by term (for reports and calibration)."""
        return StepCost(*self._terms(b))

    def _terms(self, b: BatchShape) -> tuple[float, float, float, float]:
        bw = self._bw
        lin_flops = self._lin_flops_tok * b.num_tokens + self._head_flops_tok * b.num_sampled
        linear = max(lin_flops / self._gemm_flops, self._weight_read / bw)
        pre = dec = 0.0
        if b.prefill_seqs:
            pre = max(
                self._pair_flops * b.prefill_pairs / self._attn_flops,
                self._kv_tok * b.prefill_kv_tokens / bw,
            )
        if b.decode_seqs:
            dec = max(
                self._pair_flops * b.decode_kv_tokens / self._attn_flops,
                self._kv_tok * b.decode_kv_tokens / bw,
            )
        return linear, pre, dec, self._step_s + self._seq_s * b.num_seqs
