"""Token ids for workload-only traces, so the real engine can run Mooncake, Azure or BurstGPT.

An imported workload trace (``kind="workload"``, docs/traces.md) has lengths, arrival times
and, for Mooncake, chained prefix-block hash ids (one per ``hash_block_size`` = 512 tokens),
but no token ids. :func:`synthesize_tokens` makes seeded token ids for it, scaled down by
``--length-scale`` so a CPU can run it, such that the engine's prefix structure is the trace's.
The rule and what it does and does not preserve: docs/workload-tokens.md.

The rule (``B``: engine block size, ``H``: the trace's hash block size, ``s``: length scale;
``rnd(x) = floor(x + 1/2)``, halves round up, computed exactly on the float's binary value):

- Tokens per hash block: ``T = B * max(1, rnd(H * s / B))``, a whole number of engine blocks
  (512 tokens at ``s = 0.05``, ``B = 16``: ``T = 32``, not 25.6). A hashed request is scaled
  by ``T / H`` (its *effective* scale, 0.0625 here), not by ``s``, so that its hash blocks and
  its length agree.
- A hashed request with ``L`` prompt tokens spans ``m = ceil(L / H)`` hash blocks: ``f = L // H``
  full ones and, when ``t = L % H > 0``, a partial last one. Its prompt is the first ``m`` hash
  ids' token blocks, each ``T`` tokens, the partial last one cut to
  ``t' = max(1, rnd(t * T / H))`` tokens (its first ``t'``, so ``1 <= t' <= T``):
  ``L' = f * T + t'`` (``f * T`` when ``t = 0``). Hash ids past the ``m``-th are ignored; hash
  blocks past the last hash id (a row with too few ids) get tokens unique to the request.
- Output: ``max(1, rnd(O * T / H))`` for a hashed request, ``max(1, rnd(O * s))`` for one
  without hash ids (so a request's prompt/output balance is kept; the engine needs
  ``max_tokens >= 1``, as the simulator serves a 0-output request as 1 token). Its token ids
  are a seeded stream of the request's own, apart from its prompt's (validate forces them, so
  the simulator and the engine replay the same tokens).
- A request without hash ids (Azure, BurstGPT; also Mooncake rows with an empty list):
  ``L' = max(1, rnd(L * s))`` tokens of its own seeded sequence.
- Arrival times are NOT scaled: ``arrival_s`` is the trace's. Shrinking prompts does not
  shrink the time a CPU engine takes in proportion (a small model on a CPU is not a large one
  on a GPU, scaled), so no factor follows from the length scale; compressing or stretching
  time to hit a load level is a separate, explicit choice of the caller.

Invariants (tests/test_workload_tokens.py checks each):

- Same hash id -> the same tokens at every occurrence (a partial occurrence is a prefix of the
  block's ``T`` tokens), derived from ``(seed, hash id)`` only, so a request's tokens do not
  depend on which other requests are passed. A request's own tokens derive from
  ``(seed, request id)``.
- Different hash ids -> different token blocks, and no accidental sharing between requests:
  the first engine block of every hash block and of every request's own sequence is distinct
  from every other one in the call (checked; a collision, i.e. a vocabulary too small, raises
  :class:`~memshare.errors.InputError`). Hence two prompts share their first ``k`` full engine
  blocks exactly when their hash ids say so: the prefix hit rate in engine blocks is the trace's
  hash-level one in scaled blocks (exactly, where no hash id occurs with fewer full engine
  blocks than a later occurrence of it: see docs/workload-tokens.md).
- Every token id is in ``[0, vocab_size)`` and not in ``excluded_ids``.
- Deterministic: the same records, options and seed give the same ids (blake2b in counter
  mode, stable across processes, Python and numpy versions; no ``PYTHONHASHSEED``).
- Bad options raise ``InputError`` naming the option: ``--length-scale`` outside (0, 1],
  ``--block-size`` < 1, ``--model`` whose vocabulary has fewer than 2 usable ids.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from memshare.errors import InputError
from memshare.limits import check_tokens_per_block
from memshare.traces.schema import RequestRecord

_TAG = "memshare-workload-tokens-v1"
_PER_DIGEST = 8  # 64-bit words per 64-byte blake2b digest
MIN_USABLE_VOCAB = 2  # fewer usable ids than this cannot make two blocks differ


@dataclass(frozen=True, slots=True)
class SynthRequest:
    """One trace request with synthesized tokens: what ``EngineSpec(rid, prompt_ids,
    max_tokens)`` needs, its (unscaled) arrival and the trace's own lengths."""

    rid: str  # the trace's request id
    arrival_s: float  # the trace's arrival time, unscaled
    prompt_ids: list[int]  # scaled prompt (see the module docstring for its length)
    max_tokens: int  # scaled output length, >= 1
    output_ids: list[int]  # ``max_tokens`` seeded output tokens (forced: both executors replay)
    source_prompt_len: int  # the trace's prompt tokens
    source_output_len: int  # the trace's output tokens (may be 0)


def round_half_up(x: Fraction) -> int:
    """``floor(x + 1/2)``: the rounding of every scaled length here."""
    return math.floor(x + Fraction(1, 2))


def hash_block_tokens(length_scale: float, block_size: int, hash_block_size: int) -> int:
    """``T``: tokens per scaled hash block, a whole number of engine blocks (at least one)."""
    check_scale(length_scale)
    check_tokens_per_block(block_size)
    _check_hash_block_size(hash_block_size)
    per = round_half_up(Fraction(hash_block_size) * Fraction(length_scale) / block_size)
    return block_size * max(1, per)


def scaled_tail(tail: int, block_tokens: int, hash_block_size: int) -> int:
    """``t'``: tokens kept of a partial last hash block of ``tail`` (1..H-1) trace tokens."""
    return max(1, round_half_up(Fraction(tail * block_tokens, hash_block_size)))


def synthesize_tokens(
    records: Iterable[RequestRecord],
    *,
    length_scale: float,
    block_size: int,
    vocab_size: int,
    excluded_ids: Collection[int] = (),
    seed: int = 0,
    hash_block_size: int | None = None,
) -> list[SynthRequest]:
    """Scaled prompts of seeded token ids for workload-trace ``records``, in the order given.

    ``vocab_size`` and ``excluded_ids`` (special tokens; ids outside the vocabulary are
    ignored) come from the tokenizer. ``hash_block_size`` is the trace's
    ``manifest.hash_block_size``, needed only when some record has hash ids. The rule and the
    invariants: the module docstring and docs/workload-tokens.md.
    """
    check_scale(length_scale)
    check_tokens_per_block(block_size)
    vocab = _usable_ids(vocab_size, excluded_ids)
    scale = Fraction(length_scale)
    draw = _Drawer(vocab, seed, block_size)
    block_tokens: int | None = None
    out: list[SynthRequest] = []
    seen_ids: set[str] = set()
    for rec in records:
        _check_workload_record(rec, seen_ids, hash_block_size)
        if rec.hash_ids:
            assert hash_block_size is not None
            if block_tokens is None:
                block_tokens = hash_block_tokens(length_scale, block_size, hash_block_size)
            prompt = _hashed_prompt(rec, rec.hash_ids, hash_block_size, block_tokens, draw)
            out_len = round_half_up(Fraction(rec.output_len * block_tokens, hash_block_size))
        else:
            n = max(1, round_half_up(rec.prompt_len * scale))
            prompt = draw.own(rec.id, n)
            out_len = round_half_up(rec.output_len * scale)
        outputs = draw.output(rec.id, max(1, out_len)).tolist()
        out.append(_synth(rec, prompt.tolist(), outputs))
    return out


def _check_workload_record(
    rec: RequestRecord, seen_ids: set[str], hash_block_size: int | None
) -> None:
    """``rec`` is a workload request (no token ids) whose id is new (then noted in
    ``seen_ids``); with hash ids, the trace gave its ``hash_block_size``."""
    if rec.id in seen_ids:
        raise InputError(
            f"trace request {rec.id!r}",
            "occurs twice",
            "request ids must be unique within a trace (re-import the workload)",
        )
    seen_ids.add(rec.id)
    if rec.prompt_ids is not None:
        raise InputError(
            f"trace request {rec.id!r}",
            "already has token ids (a kv trace)",
            "give a workload trace (from `memshare import`); replay kv traces as they are",
        )
    if rec.hash_ids and hash_block_size is None:
        raise InputError(
            "manifest.json",
            "field 'hash_block_size' is missing but requests carry hash_ids",
            "re-import the workload with `memshare import`",
        )


def _synth(rec: RequestRecord, prompt_ids: list[int], output_ids: list[int]) -> SynthRequest:
    """``rec`` served as ``prompt_ids`` then (forced) ``output_ids``, with its trace lengths."""
    return SynthRequest(
        rid=rec.id,
        arrival_s=rec.arrival_s,
        prompt_ids=prompt_ids,
        max_tokens=len(output_ids),
        output_ids=output_ids,
        source_prompt_len=rec.prompt_len,
        source_output_len=rec.output_len,
    )


def given_tokens(
    records: Iterable[RequestRecord],
    *,
    block_size: int,
    vocab_size: int,
    excluded_ids: Collection[int] = (),
    seed: int = 0,
) -> list[SynthRequest]:
    """The requests of a token-id workload (``memshare import tokens``) as given: prompts
    unscaled; outputs as given, or ``max(1, output_len)`` seeded tokens (the output rule
    above) where the trace has only a length. Every id must be in ``[0, vocab_size)``."""
    check_tokens_per_block(block_size)
    draw = _Drawer(_usable_ids(vocab_size, excluded_ids), seed, block_size)
    out: list[SynthRequest] = []
    for rec in records:
        if rec.prompt_ids is None:
            raise InputError(
                f"trace request {rec.id!r}",
                "has no token ids, where the trace's other requests have them",
                "re-import the workload with `memshare import tokens`",
            )
        outputs = rec.output_ids or draw.output(rec.id, max(1, rec.output_len)).tolist()
        for name, ids in (("prompt", rec.prompt_ids), ("output", outputs)):
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InputError(
                    f"trace request {rec.id!r}",
                    f"{name} token id {bad} is outside the model's vocabulary of {vocab_size}",
                    "import token ids of this model's tokenizer, or give --model",
                )
        out.append(_synth(rec, list(rec.prompt_ids), list(outputs)))
    return out


def _hashed_prompt(
    rec: RequestRecord, hash_ids: list[int], hbs: int, block_tokens: int, draw: _Drawer
) -> npt.NDArray[np.int64]:
    """The prompt of a request with hash ids (module docstring: the rule)."""
    full, tail = divmod(rec.prompt_len, hbs)
    sizes = [block_tokens] * full + ([scaled_tail(tail, block_tokens, hbs)] if tail else [])
    parts = [draw.hash_block(h, block_tokens)[:n] for h, n in zip(hash_ids, sizes, strict=False)]
    rest = sum(sizes[len(parts) :])
    if rest:  # fewer hash ids than hash blocks: the rest is the request's own
        parts.append(draw.own(rec.id, rest))
    return np.concatenate(parts)


class _Drawer:
    """Seeded token streams (blake2b in counter mode) over the usable ids, with the
    first-engine-block uniqueness check."""

    def __init__(self, vocab: npt.NDArray[np.int64], seed: int, block_size: int) -> None:
        self.vocab = vocab
        self.seed = seed
        self.block_size = block_size
        self.blocks: dict[int, npt.NDArray[np.int64]] = {}  # hash id -> its T tokens
        self.firsts: dict[bytes, str] = {}  # first engine block -> what it starts

    def hash_block(self, hash_id: int, n: int) -> npt.NDArray[np.int64]:
        """The ``n`` tokens of hash id ``hash_id`` (the same at every call)."""
        blk = self.blocks.get(hash_id)
        if blk is None:
            blk = self._stream(f"hash|{self.seed}|{hash_id}", n, f"hash id {hash_id}")
            self.blocks[hash_id] = blk
        return blk

    def own(self, rid: str, n: int) -> npt.NDArray[np.int64]:
        """``n`` tokens unique to request ``rid``."""
        return self._stream(f"request|{self.seed}|{rid}", n, f"request {rid!r}")

    def output(self, rid: str, n: int) -> npt.NDArray[np.int64]:
        """``n`` output tokens of request ``rid`` (a stream apart from its prompt's)."""
        return self._stream(f"output|{self.seed}|{rid}", n, f"request {rid!r}'s output")

    def _stream(self, key: str, n: int, what: str) -> npt.NDArray[np.int64]:
        prefix = f"{_TAG}|{key}|".encode()
        words = b"".join(
            hashlib.blake2b(prefix + i.to_bytes(8, "little"), digest_size=64).digest()
            for i in range(-(-n // _PER_DIGEST))
        )
        idx = np.frombuffer(words, dtype="<u8")[:n] % np.uint64(len(self.vocab))
        tokens = self.vocab[idx.astype(np.int64)]
        if n >= self.block_size:
            self._check_first(tokens[: self.block_size].tobytes(), what)
        return tokens

    def _check_first(self, first: bytes, what: str) -> None:
        other = self.firsts.setdefault(first, what)
        if other != what:
            raise InputError(
                "--model",
                f"its vocabulary of {len(self.vocab)} usable token ids gave {other} and {what} "
                f"the same first {self.block_size} tokens, so they would share KV blocks",
                "use a model with a larger vocabulary, another --seed or a larger --block-size",
            )


def _usable_ids(vocab_size: int, excluded_ids: Collection[int]) -> npt.NDArray[np.int64]:
    """The ids tokens are drawn from: ``[0, vocab_size)`` minus the excluded ones, sorted."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise InputError(
            "--model",
            f"vocabulary size {vocab_size!r} is not a positive integer",
            "give the tokenizer's vocabulary size",
        )
    ids = np.arange(vocab_size, dtype=np.int64)
    if excluded_ids:
        ids = np.setdiff1d(ids, np.fromiter(excluded_ids, dtype=np.int64), assume_unique=False)
    if len(ids) < MIN_USABLE_VOCAB:
        raise InputError(
            "--model",
            f"its vocabulary has {len(ids)} usable token ids ({vocab_size} less "
            f"{vocab_size - len(ids)} special ones), at least {MIN_USABLE_VOCAB} are needed",
            "use a model with a real vocabulary",
        )
    return ids


def check_scale(length_scale: float) -> None:
    ok = isinstance(length_scale, float | int) and not isinstance(length_scale, bool)
    if not ok or not 0 < length_scale <= 1:  # NaN fails the comparison too
        raise InputError(
            "--length-scale",
            f"{length_scale!r} is not in (0, 1]",
            "give a fraction of the trace's lengths, e.g. 0.05",
        )


def _check_hash_block_size(hash_block_size: int) -> None:
    if (
        isinstance(hash_block_size, bool)
        or not isinstance(hash_block_size, int)
        or hash_block_size < 1
    ):
        raise InputError(
            "manifest.json",
            f"field 'hash_block_size' is {hash_block_size!r}, not a positive number of tokens",
            "re-import the workload with `memshare import`",
        )


__all__ = [
    "MIN_USABLE_VOCAB",
    "SynthRequest",
    "check_scale",
    "hash_block_tokens",
    "round_half_up",
    "scaled_tail",
    "synthesize_tokens",
]
