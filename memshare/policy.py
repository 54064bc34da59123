"""The seam between drivers (simulator, paged engine) and sharing policies.

The driver owns time, batching and the :class:`~memshare.block_pool.BlockPool` (through
:class:`~memshare.kv_manager.KVCacheManager`); the policy owns every reuse decision and sees
only plain data: block ids, hashes, token ids, step ids and KV sketches. It is told

1. when a request arrives (:meth:`Policy.lookup_prefix`): it answers which cached blocks hold
   the request's leading prompt tokens;
2. when one of the request's logical blocks becomes full (:meth:`Policy.on_block_full`): it
   answers zero or more :class:`BlockDecision` (publish for prefix reuse, share a whole
   physical block, or share some pages), each for that block or an earlier block of the same
   request (a policy that keeps a window of recent blocks exact decides on a block once it
   leaves the window);
3. when a request ends (:meth:`Policy.on_request_end`); its blocks are freed through the pool.

A policy never imports SimPy or torch, never reads a clock, and given the same calls in the
same order makes the same decisions: that is what makes the simulator's block counts and the
paged engine's identical by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from memshare.block_pool import BlockPool, KVBlock


@dataclass(frozen=True)
class RequestInfo:
    """What a policy may know about a request when it arrives."""

    req_id: str
    prompt_len: int  # prompt tokens
    block_size: int  # tokens per block
    block_hashes: Sequence[int]  # chained hashes of the request's known blocks, in order
    hashes_cover_tail: bool = False  # True when the last hash covers a partial block (Mooncake)
    prompt_ids: np.ndarray | None = None  # prompt token ids, where the trace has them

    @property
    def prompt_blocks(self) -> int:
        """Logical prompt blocks that carry a hash: the full ones, plus a hashed partial tail."""
        full = self.prompt_len // self.block_size
        tail = self.hashes_cover_tail and self.prompt_len % self.block_size != 0
        return min(len(self.block_hashes), full + int(tail))


@dataclass(frozen=True)
class FullBlock:
    """A logical block that has just become full (its KV is final and read-only)."""

    req_id: str
    index: int  # logical block index within the request
    block_hash: int | None  # chained hash, if known
    token_ids: np.ndarray | None = None  # (block_size,) token ids, if known
    step: int | None = None  # reasoning step the block belongs to (its first token's)
    sketch: np.ndarray | None = None  # (L, 2, d) float32 K/V sketches
    norm: np.ndarray | None = None  # (L, 2) norms of the unprojected K/V


@dataclass(frozen=True)
class ReusedSpan:
    """Prompt positions ``start .. start + length - 1`` whose KV is copied from ``source``'s
    token slots ``offset .. offset + length - 1`` (KVShare), in every layer. Keys are stored
    before RoPE, so the copy is attended at its new positions as if computed there."""

    start: int  # first prompt position that receives the copy
    length: int  # tokens (>= 1)
    source: KVBlock  # a cached block holding the same tokens (pinned until the copy is done)
    offset: int  # first token slot within ``source`` (offset + length <= block size)


@dataclass(frozen=True)
class PrefixHit:
    """Answer to an arrival: cached blocks covering the request's first tokens.

    Invariants: ``spans`` are sorted, disjoint, lie in ``[num_tokens, prompt_len - 1)`` (the
    last prompt token is always computed) and their lengths sum to ``reused_tokens``.
    """

    blocks: tuple[KVBlock, ...] = ()  # cached blocks, in logical order
    num_tokens: int = 0  # prompt tokens whose KV need not be computed (< prompt_len)
    reused_tokens: int = 0  # further prompt tokens whose KV is copied from elsewhere (KVShare)
    matched_tokens: int = 0  # prompt tokens matched in other requests (KVShare's KV hit)
    spans: tuple[ReusedSpan, ...] = ()  # where the ``reused_tokens`` come from, in order


@dataclass(slots=True)
class BlockDecision:
    """What to do with one full logical block. At most one of ``share_block`` /
    ``share_mask`` is set; a decision is skipped if the entry no longer holds ``expect``.
    Read-only by contract (not frozen: one is made per filled block, and a frozen
    dataclass costs three times as much to build)."""

    index: int  # logical block of the request the decision is about
    expect: int | None = None  # physical block id the policy saw at ``index`` (None: any)
    publish_hash: int | None = None  # publish the block under this hash (prefix caching)
    share_block: int | None = None  # replace the entry by this existing physical block id
    share_mask: np.ndarray | None = None  # (L, 2) bool: pages to point at ``share_source``
    share_source: np.ndarray | None = None  # (L, 2) page ids to share where the mask is set
    distance: float | None = None  # relative distance that confirmed the share (metrics)
    # (L,) float32: each shared layer's confirmed distance (NaN at layers not shared); None
    # where the policy compares no distances per layer (the fidelity model then takes
    # ``distance``, or 1 where that is None too)
    layer_distance: np.ndarray | None = None

    @property
    def shares(self) -> bool:
        """Whether this decision shares anything."""
        return self.share_block is not None or self.share_mask is not None


class Policy(Protocol):
    """A reuse policy; see the module docstring for the contract."""

    name: str

    def lookup_prefix(self, req: RequestInfo, pool: BlockPool) -> PrefixHit:
        """Cached blocks for the request's leading prompt tokens (read-only on the pool)."""
        ...

    def on_block_full(
        self, blk: FullBlock, table: Sequence[KVBlock], pool: BlockPool
    ) -> Sequence[BlockDecision]:
        """Decisions for the block that just became full (``table[blk.index]``) or earlier
        blocks of the same request; read-only on the pool and the table."""
        ...

    def on_request_end(self, req_id: str) -> None:
        """Forget per-request state."""
        ...


def policy_check_depth(policy: Policy, num_layers: int) -> None:
    """Let the policy refuse a model of ``num_layers`` layers before any block fills (the
    optional ``check_depth(num_layers)`` hook: ``cf-topk``'s per-layer thresholds naming a
    layer past the model raise an InputError)."""
    hook = getattr(policy, "check_depth", None)
    if hook is not None:
        hook(num_layers)


def policy_layer_map(policy: Policy, num_layers: int) -> np.ndarray | None:
    """The policy's cross-layer map for the pool (the optional ``layer_map(num_layers)`` hook
    that ``kvsharer`` has), or None. Drivers build their :class:`BlockPool` with it.

    A hook may itself answer None (a composition none of whose members maps layers): that is
    "no map", the same as having no hook. A map is returned as an ``(num_layers,)`` int64
    array; anything else is a ValueError naming the policy."""
    hook = getattr(policy, "layer_map", None)
    if hook is None:
        return None
    lm = hook(num_layers)
    if lm is None:
        return None
    arr = np.asarray(lm, dtype=np.int64)
    if arr.shape != (num_layers,):
        name = getattr(policy, "name", type(policy).__name__)
        raise ValueError(
            f"policy {name!r} gave a layer map of shape {arr.shape}, expected ({num_layers},)"
        )
    return arr


def policy_shares_blocks(policy: Policy) -> bool:
    """Whether the policy's block decisions may repoint entries (share a block or pages): its
    optional ``shares_blocks`` attribute, True when absent (the safe side).

    Such a policy is asked about a full block only after the step that wrote the block's KV
    (the manager's commit): its own forward pass must write its own pages, and sketches come
    from that KV. A policy that only publishes hashes (``prefix``) is asked when the block is
    reserved, as vLLM caches a block when it schedules the tokens that fill it.
    """
    return bool(getattr(policy, "shares_blocks", True))


def policy_block_decisions(policy: Policy) -> str:
    """Which full blocks the policy may answer with a decision: its optional
    ``block_decisions`` attribute, ``"all"`` when absent (the safe side).

    ``"none"``: it never decides on a full block (``none``); ``"hashed"``: only on blocks with
    a chained hash (``prefix`` publishes them; a block without one gets no answer). The manager
    does not ask about the others, which changes nothing but the time spent asking."""
    mode = str(getattr(policy, "block_decisions", "all"))
    if mode not in ("all", "hashed", "none"):
        raise ValueError(f"policy block_decisions must be all, hashed or none, not {mode!r}")
    return mode


def policy_judges_keys(policy: Policy) -> bool:
    """Whether the policy decides by comparing blocks' key sketches: its optional
    ``judges_keys`` attribute, False when absent.

    Such a policy assumes keys taken before rotary embedding (equal content at another
    position compares equal); on a trace of post-RoPE keys it finds almost nothing to share,
    and the simulator says so (docs/policies.md)."""
    return bool(getattr(policy, "judges_keys", False))
