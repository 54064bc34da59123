"""Trace records -> simulated requests, each with its block identity.

Block identity comes from :func:`memshare.traces.request_blocks.request_info` (the same view of
a request that ``inspect`` and ``validate`` use): chained hashes over token ids (kv traces) or
the source's hash ids (Mooncake). Traces with KV sketches also give each full block its
sketch, norms, token ids and reasoning step (:class:`~memshare.policy.FullBlock`), which is what
sharing policies decide on.

A :class:`SimRequest` is the scheduler's :class:`~memshare.request.Request` (whose invariants
the scheduler keeps) plus the simulator's own fields. The simulator knows every token up
front: block hashes are precomputed from the trace (the same chained hashes the real engine
extends token by token), so it completes steps with unknown sampled tokens, and a request ends
at the trace's output length (``max_tokens``).

A request the trace records with 0 output tokens (a failed or prompt-only request, e.g. in
BurstGPT) is served as its prefill plus the 1 token that step samples: vLLM cannot run a
request for fewer (``max_tokens >= 1``), and the prefill is the work the trace implies. It is
counted honestly: metrics and ``requests.csv`` report the trace's 0 output tokens, and
``metrics.json`` counts such requests in ``requests.zero_output_served_as_1`` (present only
when there are any, so other runs' files are unchanged).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memshare.kv_manager import BlockInfoFn
from memshare.policy import FullBlock, RequestInfo
from memshare.request import Request
from memshare.traces.reader import KVRows
from memshare.traces.request_blocks import request_info
from memshare.traces.schema import Manifest, RequestRecord

NAN = math.nan


@dataclass(slots=True, eq=False)
class SimRequest(Request):
    """The scheduler's request plus what only the simulator knows: trace order, simulated
    times (stamped by the engine, never by the scheduler) and the closed-loop SimPy event."""

    index: int = 0  # position in trace order (deterministic tie-breaker)
    arrival: float = NAN  # when it entered the waiting queue the first time
    first_scheduled: float = NAN  # start of the step that first scheduled it
    first_token: float = NAN  # end of the step that produced its first token
    finish: float = NAN  # end of the step that produced its last token
    rejected: str = ""  # why it was never run (too large for the KV budget), else ""
    done: Any = None  # closed loop: SimPy event fired when it finishes or is rejected
    trace_output_len: int = -1  # output tokens the trace records (0 is served as 1)

    @property
    def output_len(self) -> int:
        """Tokens the simulator generates (``max_tokens``: the trace's, at least 1)."""
        return self.max_tokens

    @property
    def recorded_output_len(self) -> int:
        """Tokens the trace generated (what metrics count; 0 for a prompt-only request)."""
        return self.max_tokens if self.trace_output_len < 0 else self.trace_output_len


def served_output_len(trace_output_len: int) -> int:
    """Tokens a request is simulated for: the trace's, but at least the 1 token its prefill
    samples (vLLM's ``max_tokens >= 1``); see the module docstring."""
    return max(1, trace_output_len)


def build_requests(
    records: Sequence[RequestRecord],
    manifest: Manifest,
    block_size: int,
    kv_rows: dict[str, KVRows] | None = None,
) -> list[SimRequest]:
    """One :class:`SimRequest` per record, in the order given (trace order).

    ``kv_rows`` (request id -> KV rows from :meth:`TraceReader.kv`) attaches sketches; without
    it the policy sees block hashes and, where the trace has them, token ids (what ``kvshare``
    and ``token-dedup`` match on).
    """
    out: list[SimRequest] = []
    for i, rec in enumerate(records):
        info = request_info(rec, manifest, block_size)
        rows = kv_rows.get(rec.id) if kv_rows is not None else None
        known = rows is not None or rec.prompt_ids is not None
        fn = _block_source(rec, info, block_size, rows) if known else None
        out.append(
            SimRequest(
                rec.id,
                info,
                served_output_len(rec.output_len),
                block_info=fn,
                index=i,
                trace_output_len=rec.output_len,
            )
        )
    return out


def _block_source(
    rec: RequestRecord, info: RequestInfo, block_size: int, rows: KVRows | None
) -> BlockInfoFn:
    """Logical block index -> :class:`FullBlock` with the trace's tokens and sketch (where it
    has them) for that block."""
    tokens = None
    if rec.prompt_ids is not None:
        tokens = np.asarray(rec.prompt_ids + (rec.output_ids or []), dtype=np.int64)
    steps = rec.steps or []
    hashes = info.block_hashes

    def full_block(i: int) -> FullBlock:
        start = i * block_size
        step = bisect.bisect_right(steps, start) - 1 if steps else None
        sketch = norm = None
        if rows is not None and i < len(rows):
            sketch = np.asarray(rows["sketch"][i], dtype=np.float32)
            norm = np.asarray(rows["norm"][i], dtype=np.float32)
        return FullBlock(
            req_id=rec.id,
            index=i,
            block_hash=hashes[i] if i < len(hashes) else None,
            token_ids=tokens[start : start + block_size] if tokens is not None else None,
            step=step if step is None or step >= 0 else None,
            sketch=sketch,
            norm=norm,
        )

    return full_block
