"""The request the scheduler schedules: engine-neutral, typed, no clock and no event.

Both executors (the simulator in ``memshare.sim`` and the paged engine in
``memshare.validate.engine``) hand the :class:`~memshare.scheduler.Scheduler` requests of this class
(or a subclass that adds the executor's own fields: the simulator's arrival times and SimPy
event live in ``memshare.sim.workload.SimRequest``). See docs/scheduler.md.

Invariants (kept by the scheduler):

- ``0 <= num_computed <= num_tokens`` where ``num_tokens = prompt_len + num_output``;
- ``0 <= num_output <= max_tokens``; ``max_tokens >= 1``;
- a request is finished iff ``finish_reason`` is set: ``"length"`` when ``num_output``
  reached ``max_tokens``, ``"stop"`` when it sampled one of ``stop_ids``;
- where tokens are known (``token_ids is not None``), ``token_ids`` is the prompt followed by
  every sampled token, and ``hashes`` holds the chained hash of every full block of it
  (extended as tokens arrive, as vLLM's ``update_from_output`` does);
- ``state`` is the manager's :class:`~memshare.kv_manager.RequestState` while the request is
  admitted (running), else ``None``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

from memshare.hashing import block_hash, chain_hashes
from memshare.kv_manager import BlockInfoFn, RequestState
from memshare.policy import RequestInfo, ReusedSpan

R = TypeVar("R", bound="Request")


@dataclass(slots=True, eq=False)
class Request:
    """One request's scheduling state."""

    rid: str  # request id
    info: RequestInfo  # what the policy sees at arrival: prompt length, prompt block hashes
    max_tokens: int  # tokens to generate at most (>= 1)
    block_info: BlockInfoFn | None = None  # FullBlock source (trace sketches or live KV)
    token_ids: list[int] | None = None  # prompt + sampled tokens, where tokens are known
    hashes: list[int] = field(default_factory=list)  # chained hashes of the known full blocks
    stop_ids: frozenset[int] = frozenset()  # sampling one of these ends the request (EOS)
    num_computed: int = 0  # tokens whose KV is computed (or scheduled this step)
    num_output: int = 0  # tokens sampled so far
    finish_reason: str = ""  # "" while running; "length" or "stop" once finished
    hit_tokens: int = -1  # prefix-cache hit tokens at first admission (-1: never admitted)
    hit_blocks: int = 0  # prefix-cache hit blocks at first admission
    preemptions: int = 0  # times it was preempted (recomputed from scratch)
    reuse_spans: tuple[ReusedSpan, ...] = ()  # reused spans not yet scheduled (KVShare)
    quiet: int = 0  # tokens allocate_slots may take without allocating or filling a block
    lag: int = 0  # tokens computed but not yet told to the manager (all within ``quiet``)
    state: RequestState | None = field(default=None, repr=False)  # manager state if admitted
    prompt_len: int = field(init=False)  # prompt tokens (``info.prompt_len``, read per step)

    def __post_init__(self) -> None:
        self.prompt_len = self.info.prompt_len

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what a recompute must cover."""
        return self.prompt_len + self.num_output

    @property
    def finished(self) -> bool:
        """Whether the request has stopped generating."""
        return bool(self.finish_reason)

    @property
    def output_ids(self) -> list[int]:
        """The sampled tokens (empty where tokens are not known)."""
        return [] if self.token_ids is None else self.token_ids[self.prompt_len :]

    def append_token(self, token: int | None) -> None:
        """Record one sampled token (``None``: not known, only counted); set ``finish_reason``
        on a stop id or at ``max_tokens``; extend the block hashes when a block of known
        tokens completes."""
        self.num_output += 1
        if token is not None and self.token_ids is not None:
            self.token_ids.append(token)
            bs = self.info.block_size
            while (len(self.hashes) + 1) * bs <= len(self.token_ids):
                i = len(self.hashes)
                parent = self.hashes[-1] if i else None
                self.hashes.append(block_hash(parent, self.token_ids[i * bs : (i + 1) * bs]))
            if token in self.stop_ids:
                self.finish_reason = "stop"
                return
        if self.num_output >= self.max_tokens:
            self.finish_reason = "length"


def new_request(
    rid: str,
    prompt_ids: Sequence[int],
    block_size: int,
    max_tokens: int,
    *,
    stop_ids: frozenset[int] = frozenset(),
    block_info: BlockInfoFn | None = None,
) -> Request:
    """A request whose tokens are known and sampled one by one (the real engine's)."""
    if not prompt_ids:
        raise ValueError(f"request {rid!r}: empty prompt")
    if max_tokens < 1:
        raise ValueError(f"request {rid!r}: max_tokens must be >= 1, got {max_tokens}")
    tokens = [int(t) for t in prompt_ids]
    hashes = chain_hashes(tokens, block_size)
    info = RequestInfo(
        rid, len(tokens), block_size, hashes, prompt_ids=np.asarray(tokens, dtype=np.int64)
    )
    return Request(
        rid, info, max_tokens, block_info, tokens, list(hashes), stop_ids=frozenset(stop_ids)
    )


def resumed_info(req: Request) -> RequestInfo:
    """What a recompute after preemption admits: prompt and generated tokens, all as prompt.

    vLLM recomputes a preempted request's ``num_tokens`` in one prefill whose prefix lookup
    covers generated blocks too (where their hashes are known: from the tokens sampled so far,
    or precomputed from a trace). A source hash that covers a partial prompt tail (Mooncake) is
    dropped: that block now holds generated tokens after the tail, so it is not the cached one.
    """
    info = req.info
    if req.token_ids is not None:
        ids = np.asarray(req.token_ids, dtype=np.int64)
        return replace(
            info, prompt_len=req.num_tokens, block_hashes=list(req.hashes), prompt_ids=ids
        )
    hashes = info.block_hashes
    if info.hashes_cover_tail and info.prompt_len % info.block_size:
        hashes = hashes[: info.prompt_len // info.block_size]
    return replace(info, prompt_len=req.num_tokens, block_hashes=hashes, hashes_cover_tail=False)


def detach(req: Request) -> None:
    """Drop a finished request's live links (as :func:`detached`) in place: for a request
    nothing else holds (a run's own), where a copy would only cost time."""
    req.block_info = None
    req.state = None


def detached(req: R) -> R:
    """A copy of a finished request without its live links (its block source, which holds
    the trace's sketches or the engine's KV, and the manager's state): what a run's result
    keeps and ships to another process."""
    out = copy.copy(req)
    out.block_info = None
    out.state = None
    return out
