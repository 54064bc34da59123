"""The rotated-key cache of the paged KV engine: post-RoPE keys kept beside the pre-RoPE pages.

The pages (:class:`~memshare.validate.engine.store.PageStore`) hold keys before the rotary
embedding, so that a block can be read at any position (docs/paged-kv.md). Rotating every
cached key on every read, though, costs a pass over the whole context per layer and step,
although almost every key is read at the very position it was written at. This cache keeps,
for each flat store row, the key rotated once at write time and the position it was rotated
for; a read at that position takes the cached key, and only a row read elsewhere (a block
shared at an offset, a KVShare span copied from another position) is rotated again from its
pre-RoPE page, by the same function as before.

Invariants:

* ``data`` has the store's shape and dtype; ``pos[r] >= 0`` means ``flat[r]`` is the key of
  store row ``r`` rotated at position ``pos[r]`` by the engine's rotation (the same function
  and cos/sin tables a re-rotating read would use, so a cached key equals a re-rotated one to
  the last bit); ``pos[r] == -1``: no such key, a read rotates the page's key.
* ``pos`` is updated when a step is planned (:meth:`note_writes`, :meth:`note_copies`, in the
  order the layers do them), the tensor when the step's attention writes; a step that fails
  invalidates what it planned (:meth:`forget`). Nothing else writes the store's rows while a
  cache is attached: a caller that writes pages by hand calls :meth:`forget` on them (or
  drops the cache).
* The cache is the engine's speed aid, not KV state: the pool's accounting and
  ``PageStore.nbytes`` count the pages only; :attr:`nbytes` is this cache's own size.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from memshare.errors import InputError
from memshare.validate.engine.store import PageStore, check_fits

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
# per layer with keys to rotate again: (index in the layer's flattened read, store rows,
# positions to rotate them at), 1-D long tensors on the store's device
Fixes = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class RotatedKeys:
    """Post-RoPE copies of a store's key rows and the position each was rotated at."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        """``shape``: the store's ``[num_pages, block_size, kv_heads, head_dim]``."""
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        rows = int(shape[0]) * int(shape[1])
        self.flat = self.data.view(rows, *shape[2:])
        self.pos: IntArray = np.full(rows, -1, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached keys (the same as the store's pages)."""
        return int(self.data.numel() * self.data.element_size())

    # -- planning (numpy, once per step) ---------------------------------------------------

    def note_writes(self, rows: IntArray, positions: IntArray) -> None:
        """Key rows ``rows`` ``(L', T)`` (the owner layers' K write rows) are written this
        step, rotated at ``positions`` ``(T,)``."""
        self.pos[rows] = positions[None, :]

    def note_copies(self, src: IntArray, dst: IntArray) -> None:
        """Key rows ``src`` are copied to ``dst`` (both ``(L', R)``), layer by layer after
        its writes: a copy carries its source's rotation (and position) with it."""
        for s, d in zip(src, dst, strict=True):
            self.pos[d] = self.pos[s]

    def forget(self, rows: IntArray) -> None:
        """No cached key for ``rows`` any more (their pages changed outside a step)."""
        self.pos[np.asarray(rows, dtype=np.int64).reshape(-1)] = -1

    def stale(self, rows: IntArray, want: IntArray, valid: BoolArray | None = None) -> BoolArray:
        """Where a read of key rows ``rows`` ``(L, ..., n)`` at positions ``want`` (broadcast
        to ``rows``) finds no key rotated there: a bool array of ``rows``' shape, False where
        ``valid`` (broadcast likewise; ``None``: everywhere) is False (padding)."""
        out: BoolArray = self.pos[rows] != want
        if valid is not None:
            out &= valid
        return out


def rotated_cache(store: PageStore) -> RotatedKeys | None:
    """A cache for ``store``'s keys, or ``None`` where its device cannot also hold that (the
    engine then rotates keys at every read, as without a cache)."""
    try:
        check_fits(store.num_pages, store.page_bytes, store.device)
    except InputError:
        return None
    return RotatedKeys(tuple(store.data.shape), store.dtype, store.device)


def fixes_of(
    stale: BoolArray, rows: IntArray, want: IntArray, device: torch.device, width: int = 0
) -> Fixes:
    """Per layer with stale reads: ``(index, rows, positions)``, 1-D long tensors. ``stale``,
    ``rows`` ``(L, ..., n)`` as :meth:`RotatedKeys.stale` takes them, ``want`` broadcast to
    them; ``index`` counts in the layer's read flattened (row-major), each of its reads of
    ``n`` rows padded to ``width`` (``0``: not padded)."""
    out: Fixes = {}
    if not stale.any():
        return out
    want_full = np.broadcast_to(want, rows.shape)
    for layer in np.flatnonzero(stale.reshape(len(stale), -1).any(axis=1)).tolist():
        idx = np.flatnonzero(stale[layer].reshape(-1))
        n = rows.shape[-1]
        at = idx if width in (0, n) else (idx // n) * width + idx % n
        out[layer] = (
            torch.as_tensor(at, device=device),
            torch.as_tensor(rows[layer].reshape(-1)[idx], device=device),
            torch.as_tensor(np.ascontiguousarray(want_full[layer].reshape(-1)[idx]), device=device),
        )
    return out
