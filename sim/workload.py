"""Trace records -> simulated requests, each with its block identity.

Block identity comes from :func:`memshare.traces.request_blocks.request_info` (the same view of
a request that ``inspect`` and ``validate`` use): chained hashes over token ids (kv traces) or
the source's hash ids (Mooncake). Traces with KV sketches also give each full block its
sketch, norms, token ids and reasoning step (:class:`~memshare.policy.FullBlock`), which is what
sharing policies decide on.

Invariants of :class:`SimRequest` (kept by the scheduler):
``0 <= num_computed <= prompt_len + num_output``; ``0 <= num_output <= output_len``; a request
is finished iff ``num_output == output_len``; ``output_len >= 1`` (a request generates at least
one token, as in vLLM).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from memshare.kv_manager import BlockInfoFn
from memshare.policy import FullBlock, RequestInfo
from memshare.traces.reader import KVRows
from memshare.traces.request_blocks import request_info
from memshare.traces.schema import Manifest, RequestRecord

NAN = math.nan


@dataclass(slots=True, eq=False)
class SimRequest:
    """One request's life in the simulator (times in simulated seconds)."""

    index: int  # position in trace order (deterministic tie-breaker)
    rid: str  # request id (the trace's)
    info: RequestInfo  # what the policy sees: prompt length, block hashes
    prompt_len: int  # prompt tokens
    output_len: int  # tokens to generate (>= 1)
    block_info: BlockInfoFn | None = None  # FullBlock source (kv traces), else hashes only
    arrival: float = NAN  # when it entered the waiting queue the first time
    num_computed: int = 0  # tokens whose KV is computed (or scheduled this step)
    num_output: int = 0  # tokens generated so far
    first_scheduled: float = NAN  # start of the step that first scheduled it
    first_token: float = NAN  # end of the step that produced its first token
    finish: float = NAN  # end of the step that produced its last token
    hit_tokens: int = -1  # prefix-cache hit tokens at first admission (-1: never admitted)
    hit_blocks: int = 0  # prefix-cache hit blocks at first admission
    preemptions: int = 0  # times it was preempted (recomputed from scratch)
    rejected: str = ""  # why it was never run (too large for the KV budget), else ""
    done: Any = None  # closed loop: SimPy event fired when it finishes or is rejected
    reuse_left: int = 0  # prompt tokens past the hit whose KV the policy copies (KVShare)
    quiet: int = 0  # tokens allocate_slots may take without allocating or filling a block
    lag: int = 0  # tokens computed but not yet told to the manager (all within ``quiet``)
    state: Any = field(default=None, repr=False)  # the manager's RequestState while admitted

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what a recompute must cover."""
        return self.prompt_len + self.num_output

    @property
    def finished(self) -> bool:
        """Whether every output token has been generated."""
        return self.num_output >= self.output_len


def resumed_info(req: SimRequest) -> RequestInfo:
    """What a recompute after preemption admits: prompt and generated tokens, all as prompt.

    vLLM recomputes a preempted request's ``num_tokens`` in one prefill whose prefix lookup
    covers generated blocks too (where their hashes are known: traces with token ids). A
    source hash that covers a partial prompt tail (Mooncake) is dropped: that block now holds
    generated tokens after the tail, so it is not the cached one.
    """
    info = req.info
    hashes = info.block_hashes
    if info.hashes_cover_tail and info.prompt_len % info.block_size:
        hashes = hashes[: info.prompt_len // info.block_size]
    return replace(info, prompt_len=req.num_tokens, block_hashes=hashes, hashes_cover_tail=False)


def build_requests(
    records: Sequence[RequestRecord],
    manifest: Manifest,
    block_size: int,
    kv_rows: dict[str, KVRows] | None = None,
) -> list[SimRequest]:
    """One :class:`SimRequest` per record, in the order given (trace order).

    ``kv_rows`` (request id -> KV rows from :meth:`TraceReader.kv`) attaches sketches; without
    it the policy sees block hashes only.
    """
    out: list[SimRequest] = []
    for i, rec in enumerate(records):
        info = request_info(rec, manifest, block_size)
        rows = kv_rows.get(rec.id) if kv_rows is not None else None
        fn = _block_source(rec, info, block_size, rows) if rows is not None else None
        out.append(
            SimRequest(i, rec.id, info, rec.prompt_len, max(1, rec.output_len), block_info=fn)
        )
    return out


def _block_source(
    rec: RequestRecord, info: RequestInfo, block_size: int, rows: KVRows
) -> BlockInfoFn:
    """Logical block index -> :class:`FullBlock` with the trace's sketch for that block."""
    tokens = None
    if rec.prompt_ids is not None:
        tokens = np.asarray(rec.prompt_ids + (rec.output_ids or []), dtype=np.int64)
    steps = rec.steps or []
    hashes = info.block_hashes

    def full_block(i: int) -> FullBlock:
        start = i * block_size
        step = bisect.bisect_right(steps, start) - 1 if steps else None
        has_row = i < len(rows)
        return FullBlock(
            req_id=rec.id,
            index=i,
            block_hash=hashes[i] if i < len(hashes) else None,
            token_ids=tokens[start : start + block_size] if tokens is not None else None,
            step=step if step is None or step >= 0 else None,
            sketch=np.asarray(rows["sketch"][i], dtype=np.float32) if has_row else None,
            norm=np.asarray(rows["norm"][i], dtype=np.float32) if has_row else None,
        )

    return full_block
