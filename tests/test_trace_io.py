"""Trace writer/reader round trips, commit semantics, resume, and one test per bad input."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from helpers_trace_writer import (
    expected_record,
    expected_rows,
    kv_template,
    write_requests,
)

from memshare.errors import InputError, TraceEmptyError
from memshare.traces.reader import TraceReader
from memshare.traces.schema import (
    MANIFEST,
    MANIFEST_TMP,
    REQUESTS,
    Manifest,
    RequestRecord,
    shard_name,
)
from memshare.traces.writer import TraceWriter


def workload_template() -> Manifest:
    return Manifest(
        kind="workload", block_size=16, hash_block_size=512, source={"name": "mooncake"}
    )


def workload_record(i: int) -> RequestRecord:
    return RequestRecord(
        id=f"w{i}",
        arrival_s=i * 1.5,
        prompt_len=1000 + i,
        output_len=10 * i,
        hash_ids=list(range(i + 1)),
        meta={"model": "gpt-4"},
    )


def write_workload(path: Path, n: int) -> list[RequestRecord]:
    with TraceWriter(path, workload_template()) as w:
        return [w.add(workload_record(i)) for i in range(n)]


def write_kv(path: Path, n: int, **kw: Any) -> None:
    with TraceWriter(path, kv_template(), **kw) as w:
        write_requests(w, range(n))


def assert_rows_equal(got: npt.NDArray[Any], want: npt.NDArray[Any]) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tobytes() == want.tobytes()
    np.testing.assert_array_equal(got["sketch"], want["sketch"])
    np.testing.assert_array_equal(got["norm"], want["norm"])


def assert_kv_trace(reader: TraceReader, n: int) -> None:
    assert len(reader) == n
    for i, rec in enumerate(reader):
        assert rec.kv is not None
        assert rec == _with_kv(expected_record(i), rec)
        assert_rows_equal(reader.kv(rec), expected_rows(i))


def _with_kv(want: RequestRecord, got: RequestRecord) -> RequestRecord:
    return replace(want, kv=got.kv)


def trace_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def edit_manifest(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads((path / MANIFEST).read_text())
    change(raw)
    (path / MANIFEST).write_text(json.dumps(raw, indent=2))


def reseal_requests(path: Path, data: bytes) -> None:
    """Write a manifest that commits ``data`` as requests.jsonl (length and sha256), as a
    writer would: the reader's own checks on the lines are then what is tested."""
    (path / REQUESTS).write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    edit_manifest(path, lambda m: m.update(requests_bytes=len(data), requests_sha256=digest))


def test_changing_one_committed_byte_of_requests_is_refused(tmp_path: Path) -> None:
    # Issue 11, defect 2: requests.jsonl was covered by its length only.
    path = tmp_path / "t"
    write_kv(path, 3)
    data = bytearray((path / REQUESTS).read_bytes())
    i = data.index(b'"prompt_ids":[') + len(b'"prompt_ids":[')
    data[i] = ord("9") if data[i] != ord("9") else ord("8")  # one token id, same length
    (path / REQUESTS).write_bytes(bytes(data))
    for verify in (True, False):
        with pytest.raises(InputError, match=r"requests\.jsonl: checksum mismatch"):
            TraceReader(path, verify=verify)
    with pytest.raises(InputError, match=r"requests\.jsonl: checksum mismatch"):
        TraceWriter.resume(path)


# -- round trips ---------------------------------------------------------------------------


def test_workload_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "wl"
    written = write_workload(path, 5)
    reader = TraceReader(path)
    assert reader.records() == written
    assert list(reader) == written
    m = reader.manifest
    assert m.complete and m.kind == "workload" and m.hash_block_size == 512
    assert (m.counts.requests, m.counts.kv_rows) == (5, 0)
    assert m.counts.prompt_tokens == sum(r.prompt_len for r in written)
    assert m.counts.output_tokens == sum(r.output_len for r in written)
    assert m.requests_bytes == (path / REQUESTS).stat().st_size
    assert m.shards == ()
    assert not reader.is_empty
    report = reader.verify()
    assert report["requests"] == 5
    assert {"shard_checksums", "counts", "unique_ids", "kv_refs"} <= set(report["checks"])
    with pytest.raises(ValueError, match="no KV rows"):
        reader.kv(written[0])


def test_kv_round_trip_with_shard_rotation(tmp_path: Path) -> None:
    path = tmp_path / "kv"
    n = 30
    write_kv(path, n, shard_max_bytes=2000)
    reader = TraceReader(path)
    assert_kv_trace(reader, n)
    m = reader.manifest
    assert len(m.shards) > 3
    assert [s.file for s in m.shards] == [shard_name(i) for i in range(len(m.shards))]
    assert m.counts.kv_rows == sum(len(expected_rows(i)) for i in range(n))
    assert sum(s.rows for s in m.shards) == m.counts.kv_rows
    # a shard only grows past the limit when it holds a single request
    row_size = expected_rows(0).dtype.itemsize
    assert all(s.bytes <= 2000 or s.bytes == s.rows * row_size for s in m.shards)
    refs = [r.kv for r in reader]
    assert all(r is not None for r in refs)
    assert len({r.shard for r in refs if r is not None}) == len(m.shards)


def test_add_returns_stored_record_with_kv_ref(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "t", kv_template()) as w:
        a = w.add(expected_record(0), expected_rows(0))
        b = w.add(expected_record(1), expected_rows(1))
    assert a.kv is not None and b.kv is not None
    assert (a.kv.shard, a.kv.row, a.kv.rows) == (0, 0, len(expected_rows(0)))
    assert (b.kv.shard, b.kv.row) == (0, len(expected_rows(0)))


def test_empty_trace_opens(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    with TraceWriter(path, kv_template()):
        pass
    reader = TraceReader(path)
    assert len(reader) == 0 and reader.is_empty
    assert reader.manifest.complete
    assert reader.verify()["requests"] == 0


def test_commit_every_controls_visibility(tmp_path: Path) -> None:
    path = tmp_path / "t"
    with TraceWriter(path, kv_template(), commit_every=3) as w:
        write_requests(w, range(2))
        assert len(TraceReader(path)) == 0
        write_requests(w, range(2, 3))
        assert len(TraceReader(path)) == 3
        write_requests(w, range(3, 5))
        assert len(TraceReader(path)) == 3
        assert not TraceReader(path).manifest.complete
    reader = TraceReader(path)
    assert reader.manifest.complete
    assert_kv_trace(reader, 5)


def test_exception_in_with_commits_but_stays_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "t"
    with pytest.raises(KeyError), TraceWriter(path, kv_template(), commit_every=100) as w:
        write_requests(w, range(4))
        raise KeyError("boom")
    reader = TraceReader(path)
    assert not reader.manifest.complete
    assert_kv_trace(reader, 4)


def test_duplicate_id_is_input_error(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "t", workload_template()) as w:
        w.add(workload_record(0))
        with pytest.raises(InputError, match=r"requests\.jsonl.*'id' 'w0'"):
            w.add(workload_record(0))
    assert len(TraceReader(tmp_path / "t")) == 1


def test_writer_refuses_existing_trace(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_workload(path, 1)
    with pytest.raises(InputError, match=r"already holds a trace.*-o") as e:
        TraceWriter(path, workload_template())
    assert str(path) in str(e.value)


def test_writer_accepts_existing_empty_directory(tmp_path: Path) -> None:
    write_workload(tmp_path, 2)
    assert len(TraceReader(tmp_path)) == 2


def test_wrong_kv_dtype_is_rejected(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "t", kv_template()) as w:
        with pytest.raises(ValueError, match="dtype"):
            w.add(expected_record(0), np.zeros(3, dtype=np.float32))
        w.add(expected_record(0), expected_rows(0))
    assert_kv_trace(TraceReader(tmp_path / "t"), 1)


# -- resume --------------------------------------------------------------------------------


def test_resume_truncates_crash_leftovers_and_continues(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    write_kv(straight, 8, shard_max_bytes=3000)

    path = tmp_path / "crashed"
    w = TraceWriter(path, kv_template(), shard_max_bytes=3000)
    write_requests(w, range(5))  # committed (commit_every=1); then "crash": no close
    w._close_files()
    committed = TraceReader(path).manifest
    last = committed.shards[-1].file
    with (path / REQUESTS).open("ab") as f:
        f.write(b'{"id":"req-00005","arrival_s":1.2')  # partial line
    with (path / last).open("ab") as f:
        f.write(b"\x01" * 77)  # rows of a request that never got its line
    (path / shard_name(len(committed.shards) + 3)).write_bytes(b"\x02" * 40)
    (path / MANIFEST_TMP).write_text("{")

    assert_kv_trace(TraceReader(path), 5)  # leftovers are ignored by the reader

    w2 = TraceWriter.resume(path, shard_max_bytes=3000)
    assert w2.committed_ids == {f"req-{i:05d}" for i in range(5)}
    assert (path / REQUESTS).stat().st_size == committed.requests_bytes
    assert (path / last).stat().st_size == committed.shards[-1].bytes
    assert not (path / MANIFEST_TMP).exists()
    with pytest.raises(InputError, match="already in the trace"):
        w2.add(expected_record(4), expected_rows(4))
    with w2:
        write_requests(w2, range(5, 8))
    assert_kv_trace(TraceReader(path), 8)
    assert trace_files(path) == trace_files(straight)


def test_resume_with_template_starts_over_when_nothing_was_committed(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.mkdir()
    (path / REQUESTS).write_bytes(b'{"id":')
    (path / shard_name(0)).write_bytes(b"\x00" * 10)
    with pytest.raises(TraceEmptyError):
        TraceWriter.resume(path)
    with TraceWriter.resume(path, template=kv_template()) as w:
        write_requests(w, range(3))
    assert_kv_trace(TraceReader(path), 3)


def test_resume_rejects_corrupt_committed_shard(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_kv(path, 3)
    _flip_byte(path / shard_name(0), 5)
    with pytest.raises(InputError, match="checksum mismatch"):
        TraceWriter.resume(path)


# -- bad inputs ----------------------------------------------------------------------------


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_wrong_schema_version(tmp_path: Path) -> None:
    write_workload(tmp_path / "t", 2)
    edit_manifest(tmp_path / "t", lambda m: m.update(schema_version=99))
    with pytest.raises(InputError, match=r"manifest\.json: field 'schema_version' is 99"):
        TraceReader(tmp_path / "t")


def test_missing_manifest_field(tmp_path: Path) -> None:
    write_workload(tmp_path / "t", 2)
    edit_manifest(tmp_path / "t", lambda m: m.pop("requests_bytes"))
    with pytest.raises(InputError, match=r"manifest\.json: missing field 'requests_bytes'"):
        TraceReader(tmp_path / "t")


def test_manifest_not_json(tmp_path: Path) -> None:
    write_workload(tmp_path / "t", 1)
    (tmp_path / "t" / MANIFEST).write_text("{not json")
    with pytest.raises(InputError, match=r"manifest\.json: not valid JSON"):
        TraceReader(tmp_path / "t")


def test_truncated_shard(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_kv(path, 4)
    shard = path / shard_name(0)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(InputError, match=r"kv-00000\.bin: truncated shard") as e:
        TraceReader(path, verify=False)
    assert "'shards'" in str(e.value)


def test_missing_shard(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_kv(path, 2)
    (path / shard_name(0)).unlink()
    with pytest.raises(InputError, match=r"kv-00000\.bin: shard listed in manifest\.json"):
        TraceReader(path)


def test_flipped_byte_is_checksum_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_kv(path, 4)
    _flip_byte(path / shard_name(0), 100)
    with pytest.raises(InputError, match=r"kv-00000\.bin: checksum mismatch.*re-capture"):
        TraceReader(path)
    reader = TraceReader(path, verify=False)  # opens; verify() finds it
    assert len(reader) == 4
    with pytest.raises(InputError, match=r"kv-00000\.bin: checksum mismatch"):
        reader.verify()
    assert reader.verify(checksums=False)["requests"] == 4


def test_bytes_past_committed_length_are_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_kv(path, 2)
    with (path / shard_name(0)).open("ab") as f:
        f.write(b"garbage")
    assert_kv_trace(TraceReader(path), 2)


def test_request_line_not_json(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_workload(path, 3)
    lines = (path / REQUESTS).read_bytes().splitlines(keepends=True)
    lines[1] = b"this is not json\n"
    data = b"".join(lines)
    (path / REQUESTS).write_bytes(data)
    reseal_requests(path, data)
    with pytest.raises(InputError, match=r"requests\.jsonl:2: not valid JSON"):
        TraceReader(path, verify=False)


def test_request_line_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_workload(path, 2)
    lines = (path / REQUESTS).read_bytes().splitlines(keepends=True)
    raw = json.loads(lines[0])
    del raw["prompt_len"]
    lines[0] = json.dumps(raw).encode() + b"\n"
    data = b"".join(lines)
    (path / REQUESTS).write_bytes(data)
    reseal_requests(path, data)
    with pytest.raises(InputError, match=r"requests\.jsonl:1: missing field 'prompt_len'"):
        TraceReader(path, verify=False)


def test_requests_shorter_than_committed(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_workload(path, 3)
    (path / REQUESTS).write_bytes((path / REQUESTS).read_bytes()[:20])
    with pytest.raises(InputError, match=r"requests\.jsonl: truncated.*'requests_bytes'"):
        TraceReader(path)


def test_counts_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_workload(path, 3)
    edit_manifest(path, lambda m: m["counts"].update(requests=4))
    with pytest.raises(InputError, match=r"manifest\.json: field 'counts\.requests' is 4"):
        TraceReader(path)


def test_kv_ref_outside_shard(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_kv(path, 2)
    lines = (path / REQUESTS).read_bytes().splitlines(keepends=True)
    raw = json.loads(lines[1])
    raw["kv"]["row"] += 1000
    lines[1] = json.dumps(raw).encode() + b"\n"
    data = b"".join(lines)
    (path / REQUESTS).write_bytes(data)
    reseal_requests(path, data)
    with pytest.raises(InputError, match=r"requests\.jsonl:2: field 'kv'.*outside"):
        TraceReader(path)


def test_directory_that_is_not_a_trace(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=r"not a memshare trace \(no manifest\.json\)") as e:
        TraceReader(tmp_path)
    assert not isinstance(e.value, TraceEmptyError)
    assert str(tmp_path) in str(e.value) and "memshare import" in str(e.value)


def test_path_missing_or_a_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        TraceReader(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is not a directory"):
        TraceReader(tmp_path / "f")


def test_leftovers_without_manifest_are_trace_empty(tmp_path: Path) -> None:
    (tmp_path / REQUESTS).write_bytes(b"")
    with pytest.raises(TraceEmptyError, match=r"empty.*interrupted before its first commit"):
        TraceReader(tmp_path)
