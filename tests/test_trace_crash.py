"""Crash safety for real: SIGKILL a writer process at a seeded random moment, then read.

Each kill is proved to land mid-write: the helper reports every committed request, a kill is
placed after a seeded one, and the test checks the process was killed (not exited) before it
closed the trace, with at least that request committed on disk.

Invariant under test: after a kill at any moment, the trace directory either raises
``TraceEmptyError`` (killed before the first commit), holds nothing at all (killed before
the writer created a file), or opens and yields a prefix ``0..n-1`` of the requests, each
whole (its KV rows exactly as written), with matching counts. ``TraceWriter.resume`` then
finishes it into a trace byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from helpers_trace_writer import (
    expected_record,
    expected_rows,
    kv_template,
    write_requests,
)

from memshare.errors import InputError, TraceEmptyError
from memshare.traces.reader import TraceReader
from memshare.traces.writer import TraceWriter

pytestmark = pytest.mark.slow  # 24 writer processes killed at seeded moments

HELPER = Path(__file__).resolve().parent / "helpers_trace_writer.py"
N = 200
SHARD_MAX = 40_000  # about 50 requests per shard: kills also land around rotations
SEEDS = range(24)
MARGIN = 40  # requests never killed after: 40 adds (~0.8 s here) before the writer closes


def _start(out: Path) -> subprocess.Popen[bytes]:
    """Start the helper and return once it printed ``ready`` (imports done)."""
    proc = subprocess.Popen(
        [sys.executable, str(HELPER), str(out), str(N), str(SHARD_MAX)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n", "helper failed to start"
    return proc


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run of the helper: its trace and its timings after ``ready``."""

    path: Path
    open_s: float  # until the writer was open (initial manifest committed)
    total_s: float  # until the trace was closed

    @property
    def add_s(self) -> float:
        """Mean time of one ``add`` (with its commit)."""
        return (self.total_s - self.open_s) / N


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    out = tmp_path_factory.mktemp("reference") / "trace"
    proc = _start(out)
    assert proc.stdout is not None
    t0 = time.perf_counter()
    assert proc.stdout.readline() == b"opened\n"
    open_s = time.perf_counter() - t0
    for i in range(N):
        assert proc.stdout.readline() == f"added {i}\n".encode()
    assert proc.stdout.readline() == b"done\n"
    total_s = time.perf_counter() - t0
    assert proc.wait(timeout=60) == 0
    return Reference(out, open_s, total_s)


@dataclass(frozen=True)
class Kill:
    """When a seed kills: after request ``after`` was reported committed (None: counted from
    ``ready``, while the writer opens), plus ``delay`` seconds."""

    after: int | None
    delay: float


def _kill_plan(seed: int, ref: Reference) -> Kill:
    """Every 4th seed dies while the writer opens (before or just after its first commit);
    the rest while requests are added, after a seeded request (kills also land around shard
    rotations, every ~50 requests) and a seeded part of one ``add``. The last ``MARGIN``
    requests are left out so that no kill can arrive after the writer closed: each kill must
    land mid-write, which the test checks."""
    rng = random.Random(seed)
    if seed % 4 == 0:
        return Kill(None, rng.uniform(0.0, 1.5) * ref.open_s)
    return Kill(rng.randrange(N - MARGIN), rng.uniform(0.0, 1.0) * ref.add_s)


def _kill(proc: subprocess.Popen[bytes], plan: Kill) -> bytes:
    """Carry out ``plan`` on the running helper; return what it printed after ``ready``."""
    assert proc.stdout is not None
    seen = b""
    if plan.after is not None:
        want = f"added {plan.after}\n".encode()
        while not seen.endswith(want):
            line = proc.stdout.readline()
            assert line.startswith((b"opened", b"added")), line
            seen += line
    time.sleep(plan.delay)
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate(timeout=60)
    return seen + rest


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _check_committed_prefix(path: Path) -> tuple[int, str]:
    """Assert what a killed writer left is empty or a whole prefix; return its length."""
    if not path.exists() or not any(path.iterdir()):
        with pytest.raises(InputError):
            TraceReader(path)
        return 0, "no files"
    try:
        reader = TraceReader(path)  # verifies checksums, counts, ids, kv refs
    except TraceEmptyError:
        return 0, "TraceEmptyError"
    n = len(reader)
    rows = 0
    for i, rec in enumerate(reader):
        assert rec.kv is not None
        assert rec == replace(expected_record(i), kv=rec.kv)  # ids are the prefix 0..n-1
        got, want = reader.kv(rec), expected_rows(i)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
        rows += len(want)
    counts = reader.manifest.counts
    assert (counts.requests, counts.kv_rows) == (n, rows)
    assert n == N or not reader.manifest.complete
    reader.close()
    return n, "complete" if reader.manifest.complete else "prefix"


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_leaves_whole_requests_and_resume_finishes(
    seed: int, reference: Reference, tmp_path: Path
) -> None:
    plan = _kill_plan(seed, reference)
    out = tmp_path / "trace"
    proc = _start(out)
    said = _kill(proc, plan)

    # the kill landed mid-write: the helper was still running (killed, not exited), had not
    # closed the trace (no "done", no complete manifest) and, for a kill placed after request
    # ``after``, had committed at least that far (the writer's own commits, on disk)
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    assert b"done" not in said, said[-200:]
    n, outcome = _check_committed_prefix(out)
    assert outcome != "complete"
    if plan.after is not None:
        assert n > plan.after, (n, plan)
    print(f"seed {seed}: kill {plan}: {outcome}, {n} committed, {_uncommitted(out)} torn bytes")

    with TraceWriter.resume(out, template=kv_template(), shard_max_bytes=SHARD_MAX) as w:
        assert w.committed_ids == {expected_record(i).id for i in range(n)}
        write_requests(w, range(n, N))
    assert _files(out) == _files(reference.path)
    assert len(TraceReader(out)) == N


def _uncommitted(path: Path) -> int:
    """Bytes on disk past what the manifest commits (a kill inside an ``add``), for the log."""
    if not path.is_dir():
        return 0
    size = {p.name: p.stat().st_size for p in path.iterdir()}
    if "manifest.json" not in size:
        return sum(size.values())
    m = json.loads((path / "manifest.json").read_text())
    torn = size.get("requests.jsonl", 0) - int(m["requests_bytes"])
    return torn + sum(size.get(sh["file"], 0) - int(sh["bytes"]) for sh in m["shards"])
