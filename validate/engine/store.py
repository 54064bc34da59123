"""The page store of the paged KV engine: one preallocated tensor holding every page.

One page is one layer's keys (or values) for one block of ``block_size`` tokens, so the store
is a tensor ``data`` of shape ``[num_pages, block_size, num_kv_heads, head_dim]``. Keys are
stored **before** the rotary embedding (for Qwen3-style models: after ``k_norm``); the engine
rotates them by their logical positions when it reads them (see ``docs/paged-kv.md``).

Invariants:

* ``data`` is allocated once and never resized; ``flat`` is a view of it with shape
  ``[num_pages * block_size, num_kv_heads, head_dim]``: row ``page * block_size + offset``
  is token slot ``offset`` of page ``page``. Writes go through ``flat`` with ``index_copy_``.
* The store knows nothing about layers, K/V or sequences: a page id is only a page id. Which
  page holds what is the caller's block table (``pages[block, layer, 0=K/1=V]``).
* ``nbytes`` is measured from the tensor itself, ``page_bytes * num_pages``.
* A :meth:`part` views a contiguous range of another store's pages (one arena for several
  engines); its ``data`` is that slice of the arena's tensor, never a copy.
* No store is allocated that the device cannot hold (:func:`check_fits`): a budget or block
  size whose pages cannot exist is one line with the figure it would need, not the
  allocator's error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from memshare.errors import InputError
from memshare.traces.model.device import free_bytes


def as_index(x: Any, device: Any) -> torch.Tensor:
    """``x`` (array-like or tensor of ints) as a 1-D int64 tensor on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.long).reshape(-1)
    return torch.as_tensor(np.asarray(x, dtype=np.int64).reshape(-1), device=device)


def check_fits(num_pages: int, page_bytes: int, device: Any) -> None:
    """Refuse, in one line with the figures, pages whose memory ``device`` cannot give (at
    most 90% of what it has free: the model and the activations need the rest)."""
    need = int(num_pages) * page_bytes
    free = free_bytes(str(device))
    if free is not None and need > 0.9 * free:
        raise InputError(
            "KV pages",
            f"{num_pages:,} pages of {page_bytes:,} bytes need {need / 2**30:,.2f} GiB, and "
            f"{device} has {free / 2**30:,.2f} GiB free",
            "lower --kv-blocks, --block-size, --max-tokens or the number of prompts",
        )


class PageStore:
    """Preallocated pages ``[num_pages, block_size, num_kv_heads, head_dim]``."""

    def __init__(
        self,
        num_pages: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: Any = torch.float32,
        device: Any = "cpu",
    ) -> None:
        if min(num_pages, block_size, num_kv_heads, head_dim) <= 0:
            raise ValueError("num_pages, block_size, num_kv_heads and head_dim must be > 0")
        element = torch.empty((), dtype=dtype).element_size()
        check_fits(num_pages, int(block_size) * num_kv_heads * head_dim * element, device)
        self._adopt(
            torch.zeros(
                (int(num_pages), int(block_size), int(num_kv_heads), int(head_dim)),
                dtype=dtype,
                device=device,
            )
        )

    def _adopt(self, data: torch.Tensor) -> None:
        self.num_pages, self.block_size, self.num_kv_heads, self.head_dim = (
            int(x) for x in data.shape
        )
        self.data: torch.Tensor = data
        self.flat: torch.Tensor = data.view(
            self.num_pages * self.block_size, self.num_kv_heads, self.head_dim
        )

    def part(self, first: int, num_pages: int) -> PageStore:
        """Pages ``first .. first + num_pages - 1`` as a store of their own: its page ``i`` is
        page ``first + i`` here, the same memory (nothing is copied). Engines whose stores are
        parts of one arena can run their steps in one forward pass over the arena."""
        if first < 0 or num_pages <= 0 or first + num_pages > self.num_pages:
            raise ValueError(
                f"pages {first}..{first + num_pages - 1} are not within 0..{self.num_pages - 1}"
            )
        out = PageStore.__new__(PageStore)
        out._adopt(self.data[first : first + num_pages])
        return out

    @classmethod
    def for_model(
        cls,
        hf_model: Any,
        num_pages: int,
        block_size: int,
        *,
        dtype: Any = None,
        device: Any = None,
    ) -> PageStore:
        """A store shaped for ``hf_model`` (its KV heads and head size, dtype and device)."""
        cfg = hf_model.config
        heads = int(cfg.num_attention_heads)
        kvh = int(getattr(cfg, "num_key_value_heads", None) or heads)
        hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        p = next(hf_model.parameters())
        return cls(
            num_pages,
            block_size,
            kvh,
            hd,
            dtype=p.dtype if dtype is None else dtype,
            device=p.device if device is None else device,
        )

    # -- facts ---------------------------------------------------------------------------

    @property
    def dtype(self) -> Any:
        """Element type of the pages."""
        return self.data.dtype

    @property
    def device(self) -> Any:
        """Device the pages live on."""
        return self.data.device

    @property
    def page_bytes(self) -> int:
        """Bytes of one page: ``block_size * num_kv_heads * head_dim * element size``."""
        return int(self.data[0].numel() * self.data.element_size())

    @property
    def nbytes(self) -> int:
        """Bytes the store's tensor occupies (measured from the tensor)."""
        return int(self.data.numel() * self.data.element_size())

    # -- rows ----------------------------------------------------------------------------

    def rows(self, pages: Any, offsets: Any) -> torch.Tensor:
        """Flat row indices ``page * block_size + offset`` (1-D int64 on the store's device)."""
        p = as_index(pages, self.device)
        o = as_index(offsets, self.device)
        if p.shape != o.shape:
            raise ValueError(f"pages {tuple(p.shape)} and offsets {tuple(o.shape)} differ")
        if p.numel() and (int(o.min()) < 0 or int(o.max()) >= self.block_size):
            raise ValueError(f"offsets must lie in [0, {self.block_size})")
        return p * self.block_size + o

    def write_flat(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` ``(N, kvh, hd)`` (any float dtype) into flat rows ``rows`` ``(N,)``.

        Rows must be distinct within one call (``index_copy_`` leaves duplicates undefined).
        """
        self.flat.index_copy_(
            0, rows, values.reshape(-1, self.num_kv_heads, self.head_dim).to(self.dtype)
        )

    def copy_flat(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy rows ``src`` into rows ``dst`` (1-D, same length; ``dst`` holds no ``src``)."""
        self.flat.index_copy_(0, dst, self.flat.index_select(0, src))

    def gather_flat(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (any shape ``S``) as a tensor ``S + (kvh, hd)`` (a copy)."""
        out = self.flat.index_select(0, rows.reshape(-1))
        return out.view(*rows.shape, self.num_kv_heads, self.head_dim)

    def write_rows(self, pages: Any, offsets: Any, values: torch.Tensor) -> None:
        """Write token slots: ``values[i]`` ``(kvh, hd)`` goes to ``(pages[i], offsets[i])``."""
        self.write_flat(self.rows(pages, offsets), values)

    def gather_rows(self, pages: Any, offsets: Any) -> torch.Tensor:
        """Token slots ``(pages[i], offsets[i])`` as ``(N, kvh, hd)``."""
        return self.gather_flat(self.rows(pages, offsets))

    # -- blocks --------------------------------------------------------------------------

    def block_kv(self, pages: npt.ArrayLike) -> torch.Tensor:
        """One block's pages: ``pages`` ``(L, 2)`` page ids -> ``(L, 2, block_size, kvh, hd)``."""
        ids = np.asarray(pages, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] != 2:
            raise ValueError(f"pages must have shape (L, 2), got {ids.shape}")
        idx = as_index(ids, self.device)
        return self.data.index_select(0, idx).view(
            *ids.shape, self.block_size, self.num_kv_heads, self.head_dim
        )

    def block_kv_numpy(self, pages: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """:meth:`block_kv` as float32 numpy, the input ``memshare.sketch.sketch_blocks`` takes
        (pre-RoPE keys; ``kv[:, 0]`` keys, ``kv[:, 1]`` values)."""
        arr: npt.NDArray[np.float32] = (
            self.block_kv(pages).to(device="cpu", dtype=torch.float32).contiguous().numpy()
        )
        return arr

    def exact_distance(
        self, pages_a: npt.ArrayLike, pages_b: npt.ArrayLike
    ) -> npt.NDArray[np.float64]:
        """Relative distance ``||a - b|| / ||a||`` per layer and K/V between two blocks' live
        pages (``(L, 2)`` page ids each) -> ``(L, 2)`` float64; computed in float64 on the
        store's device. A zero ``a`` gives ``inf`` (``nan`` when ``b`` is zero too)."""
        a = self.block_kv(pages_a).double()
        b = self.block_kv(pages_b).double()
        if a.shape != b.shape:
            raise ValueError(f"pages_a {tuple(a.shape[:2])} and pages_b {tuple(b.shape[:2])}")
        diff = (a - b).flatten(2).norm(dim=-1)
        norm = a.flatten(2).norm(dim=-1)
        out: npt.NDArray[np.float64] = (diff / norm).cpu().numpy()
        return out
