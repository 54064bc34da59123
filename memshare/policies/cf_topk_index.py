"""cf-topk's neighbour index: per-request chain state, step signatures and candidate blocks.

Per request (a :class:`Chain`), keyed by logical block index: the physical id each block had
when it filled, its step, its K/V sketch and norms (by reference), and, per reasoning step
(by position of first appearance), its blocks, its token ids and a MinHash signature of its
token n-grams. :class:`NeighbourIndex` turns that into the candidate blocks of a block to
decide: the blocks of its step's ``k`` most similar earlier steps, fixed at the step's first
decision, standing for the content their entries hold now (a block shared whole stands for
its owner), plus for layer granularity the blocks later linked to those by a share.

Invariants: a closed step's signature is computed once and never changes; a signature only
ever gains tokens; candidates are sorted logical indices below the block being decided, and
the same calls in the same order give the same candidates (ties towards the earlier step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from memshare.minhash import EMPTY, SIG_DTYPE, MinHasher

NO_CANDIDATES: list[int] = []


class Rows:
    """A growable array of rows (amortised O(1) append; ``view()`` is the filled part)."""

    def __init__(self, shape: tuple[int, ...], dtype: type[np.generic], fill: object = 0) -> None:
        self._a = np.full((16, *shape), fill, dtype=dtype)
        self._fill = fill
        self.n = 0

    def put(self, i: int, row: np.ndarray) -> None:
        """Set row ``i`` (growing to hold it)."""
        a = self._a
        if i >= len(a):
            grown = np.full((max(2 * len(a), i + 1), *a.shape[1:]), self._fill, dtype=a.dtype)
            grown[: len(a)] = a
            a = self._a = grown
        a[i] = row
        if i >= self.n:
            self.n = i + 1

    def view(self) -> np.ndarray:
        """Rows ``0 .. n-1``."""
        return self._a[: self.n]

    def clear(self) -> None:
        """Hold no rows (the memory is kept; rows are written again before they are read)."""
        self.n = 0


class Limits(NamedTuple):
    """Constants of one model depth: probe layers, layers allowed to fail, layers needed."""

    probe: np.ndarray  # up to four layers spread over the depth, checked first
    allowed: int  # layers allowed to fail tau (block granularity)
    need: int  # layers that must confirm
    tau: float  # ``cmp`` as a float32 (numpy compares float32 distances in float32)
    cmp: float  # the threshold distances are compared with (``tau``, or t_ref of a table)
    scale: np.ndarray | None = None  # (L, 2) per-page threshold / cmp (tau_layers), or None


@dataclass(slots=True)
class Candidates:
    """A step's candidates: its neighbour steps' blocks (``base``, fixed), the blocks whose
    content those hold (``held``) and, for layer granularity, the blocks linked to them by a
    share (``extra``), brought up to date from the chain's link log."""

    base: list[int]  # the neighbours' blocks, sorted
    base_set: set[int]
    held: list[int]  # the blocks whose content the base blocks hold (themselves, or owners)
    held_set: set[int]
    extra: set[int]  # blocks shared with a base block, not in it
    seen: int  # entries of the link log already folded into ``extra``
    probe_rows: np.ndarray | None = None  # (held, probe layers, [2,] d) float32, when used


NO_CANDS = Candidates([], set(), [], set(), set(), 0)  # never mutated: every use checks ``base``


@dataclass
class Chain:
    """Per-request state; logical block indices key everything. Sketches are kept by
    reference (a trace's memory map, or live KV sketches), never copied, except the few
    probe layers used to drop hopeless candidates early."""

    phys: dict[int, int] = field(default_factory=dict)  # logical -> physical id seen at fill
    step_of: dict[int, int] = field(default_factory=dict)  # logical -> step, where known
    sketch: dict[int, np.ndarray] = field(default_factory=dict)  # logical -> (L, 2, d)
    norm: dict[int, np.ndarray] = field(default_factory=dict)  # logical -> (L, 2)
    # (n, probe layers, 2, d) float32 copy of the probe layers (cast once here rather than
    # at every comparison: float16 casts are slow)
    probe: Rows | None = None
    limits: Limits | None = None  # the constants of the chain's depth (block granularity)
    step_ids: list[int] = field(default_factory=list)  # steps in order of first appearance
    step_pos: dict[int, int] = field(default_factory=dict)  # step -> position in step_ids
    step_blocks: list[list[int]] = field(default_factory=list)  # by position: blocks
    step_tokens: list[list[np.ndarray]] = field(default_factory=list)  # by position: tokens
    sigs: list[np.ndarray | None] = field(default_factory=list)  # (P,) MinHash by position
    sig_final: list[bool] = field(default_factory=list)  # signature of a closed step is done
    sig_done: int = 0  # every position below this has its final signature
    sig_parts: list[int] = field(default_factory=list)  # token arrays in each signature
    sig_len: list[int] = field(default_factory=list)  # tokens hashed into each signature
    # final signatures as rows by position (compared all at once), and which are non-empty
    sig_rows: Rows | None = None
    sig_live: list[bool] = field(default_factory=list)
    neighbours: dict[int, Candidates] = field(default_factory=dict)  # by position
    links: list[tuple[int, int]] = field(default_factory=list)  # shares (a, b), in order
    linked: dict[int, set[int]] = field(default_factory=dict)  # logical -> shared with
    # logical -> the earlier block whose sketch is its content, for blocks whose compared
    # part (K and V, or K) was shared whole with that block (block granularity)
    content: dict[int, int] = field(default_factory=dict)
    # logical -> (L,) the block whose content each layer holds (layer granularity shares)
    layer_content: dict[int, np.ndarray] = field(default_factory=dict)
    # float32 casts of candidates' held sketches for step position ``f32_pos`` (layer mode)
    f32_pos: int = -1
    f32: dict[int, np.ndarray] = field(default_factory=dict)
    # layer granularity: logical -> what its layers hold, as a key equal for equal content
    # (see cf_topk._content_key); a block missing here holds its own sketch (key: itself)
    content_key: dict[int, int | bytes] = field(default_factory=dict)
    # layer granularity: logical -> (L, C, s) float32, the first ``s`` coordinates of the
    # compared columns (K, or K and V) of what the block's entry holds. Set when the block is
    # decided (its own rows, the layers it shares overwritten by their content's), or when
    # it is first a candidate and holds its own sketch; rewritten whenever it shares.
    probe_of: dict[int, np.ndarray] = field(default_factory=dict)
    # those rows of the candidates of step position ``pstack_pos`` seen so far, stacked in
    # order of first appearance (``pstack_cands``); a step's candidates only grow
    pstack_pos: int = -1
    pstack_cands: list[int] = field(default_factory=list)
    pstack_set: set[int] = field(default_factory=set)
    pstack: Rows | None = None
    # the blocks' steps came in order (no step resumed after a later one began): then every
    # candidate of block j is below j and decided, so what it holds is final
    last_pos: int = -1
    in_order: bool = True


@dataclass(frozen=True)
class NeighbourIndex:
    """Finds a block's candidates in its chain: one per cf-topk configuration (the state is
    in each :class:`Chain`)."""

    k: int  # neighbour steps per step
    ngram: int  # MinHash shingle length
    num_perm: int  # MinHash signature length
    layer_links: bool  # layer granularity: blocks linked to a neighbour's by a share count
    hasher: MinHasher

    def signatures(self, chain: Chain, upto: int) -> None:
        """Bring the MinHash rows of step positions ``0..upto`` up to date (closed steps are
        computed once and then enter ``sig_rows``). A row only ever gains tokens, so only the
        n-grams ending in new tokens are hashed (the min is the same)."""
        if chain.sig_rows is None:
            chain.sig_rows = Rows((self.num_perm,), SIG_DTYPE, EMPTY)
        last = len(chain.step_ids) - 1
        todo = [p for p in range(chain.sig_done, upto + 1) if not chain.sig_final[p]]
        sigs: list[np.ndarray] = []
        runs: list[np.ndarray] = []
        for pos in todo:
            parts = chain.step_tokens[pos]
            sig = chain.sigs[pos]
            if chain.sig_parts[pos] != len(parts):  # new tokens since the last signature
                if sig is None:
                    sig = chain.sigs[pos] = self.hasher.empty()
                if parts:
                    tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)
                    start = max(0, chain.sig_len[pos] - self.ngram + 1)
                    sigs.append(sig)
                    runs.append(tokens[start:])
                    chain.sig_len[pos] = len(tokens)
                chain.sig_parts[pos] = len(parts)
        if sigs:
            self.hasher.update_many(sigs, runs)
        for pos in todo:
            sig = chain.sigs[pos]
            if pos < last:  # a later step exists: this one is closed
                chain.sig_final[pos] = True
                assert sig is not None
                chain.sig_rows.put(pos, sig)
                chain.sig_live[pos] = bool(sig[0] != EMPTY)  # an empty one matches nothing
        while chain.sig_done <= upto and chain.sig_final[chain.sig_done]:
            chain.sig_done += 1

    def candidates(self, chain: Chain, j: int) -> list[int]:
        """Logical indices of candidate blocks for block ``j``, sorted. The step's neighbours
        are fixed at its first decision (its signature then covers ``window + 1`` blocks)."""
        step = chain.step_of.get(j)
        if step is None:
            return NO_CANDIDATES
        pos = chain.step_pos[step]
        cands = chain.neighbours.get(pos)
        if cands is None:
            cands = chain.neighbours[pos] = self._new_cands(chain, pos)
        if not self.layer_links:
            # every share moved a whole block to an owner: a block linked to a neighbour's
            # block holds that block's owner (or is it), so the owners are all candidates
            return cands.held
        if not cands.base:
            return NO_CANDIDATES
        log = chain.links
        if cands.seen < len(log):  # links only grow: fold in the new ones
            inside, extra = cands.base_set, cands.extra
            for a, b in log[cands.seen :]:
                if b in inside and a not in inside:
                    extra.add(a)
                if a in inside and b not in inside:
                    extra.add(b)
            cands.seen = len(log)
        if not cands.extra:
            return cands.held
        content = chain.content
        new = {content.get(x, x) for x in cands.extra if 1 <= x < j}
        new.difference_update(cands.held_set)
        return sorted(cands.held + list(new)) if new else cands.held

    def _new_cands(self, chain: Chain, pos: int) -> Candidates:
        """Step ``pos``'s candidates at its first decision. Every earlier block has been
        decided by then, so what the neighbours' blocks hold is final."""
        base = self._neighbour_blocks(chain, pos)
        if not base:
            return NO_CANDS  # most steps: one shared empty record (fewer live objects)
        inside = set(base)
        linked = chain.linked
        extra = {x for b in base if b in linked for x in linked[b]} - inside
        content = chain.content
        held = sorted({content.get(b, b) for b in base}) if content else base
        return Candidates(base, inside, held, set(held), extra, len(chain.links))

    def _neighbour_blocks(self, chain: Chain, pos: int) -> list[int]:
        """The blocks (sorted, sink and sketchless ones left out) of the ``k`` earlier steps
        whose MinHash signatures share most values with step ``pos``'s; none for the first
        step or an empty signature."""
        if pos == 0:
            return NO_CANDIDATES
        self.signatures(chain, pos)
        sig = chain.sigs[pos]
        assert sig is not None
        if sig[0] == EMPTY:
            return NO_CANDIDATES
        # estimated Jaccard = shared MinHash values / P over the earlier (all final) rows,
        # non-empty ones only; best first, earlier on ties, zero dropped
        assert chain.sig_rows is not None
        flat = np.flatnonzero(chain.sig_rows.view()[:pos] == sig).tolist()
        live = chain.sig_live
        per = self.num_perm
        counts: dict[int, int] = {}
        for f in flat:  # row-major: position f // P matched one more value
            p = f // per
            if live[p]:
                counts[p] = counts.get(p, 0) + 1
        if not counts:
            return NO_CANDIDATES
        order = sorted(counts, key=lambda p: (-counts[p], p))
        blocks = [b for p in order[: self.k] for b in chain.step_blocks[p]]
        return sorted({b for b in blocks if b >= 1 and b in chain.sketch})


def link(chain: Chain, a: int, b: int) -> None:
    """Record that blocks ``a`` and ``b`` were linked by a share (layer granularity)."""
    chain.links.append((a, b))
    chain.linked.setdefault(a, set()).add(b)
    chain.linked.setdefault(b, set()).add(a)
