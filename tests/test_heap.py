"""validate/engine/heap.py: the allocator settings take on glibc and change nothing computed."""

from __future__ import annotations

import platform
import sys

import numpy as np
import pytest

from memshare.validate.engine.heap import tame_heap


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt only",
)
def test_tame_heap_takes_on_glibc_and_is_idempotent() -> None:
    before = np.random.default_rng(0).standard_normal((512, 512)).sum()
    assert tame_heap() is True
    assert tame_heap() is True
    assert np.random.default_rng(0).standard_normal((512, 512)).sum() == before
