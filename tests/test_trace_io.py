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
from helpers_cli import assert_one_line_error, memshare
from helpers_trace_writer import (
    expected_record,
    expected_rows,
    kv_template,
    manifest_sha256,
    sign_manifest,
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


def edit_manifest(
    path: Path, change: Callable[[dict[str, Any]], object], *, sign: bool = True
) -> None:
    """Change the manifest's fields; re-signed (``manifest_sha256``) unless ``sign`` is False,
    so the reader's checks of the edited field, not the manifest checksum, meet the edit."""
    raw = json.loads((path / MANIFEST).read_text())
    change(raw)
    (path / MANIFEST).write_text(json.dumps(sign_manifest(raw) if sign else raw, indent=2))


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


# -- the manifest's own checksum (issue 27) --------------------------------------------------

MOONCAKE_DEMO = Path(__file__).resolve().parents[1] / "memshare" / "data" / "mooncake_demo.jsonl"


def imported_trace(tmp_path: Path) -> tuple[Path, Path]:
    """(trace, source): ``memshare import mooncake`` of the first 5 bundled rows."""
    src = tmp_path / "mc.jsonl"
    src.write_text("".join(MOONCAKE_DEMO.read_text().splitlines(keepends=True)[:5]))
    trace = tmp_path / "mc"
    res = memshare("import", "mooncake", str(src), "-o", str(trace), "--limit", "4", "--json")
    assert res.returncode == 0, res.stderr
    return trace, src


def test_a_written_manifest_carries_its_own_checksum(tmp_path: Path) -> None:
    write_workload(tmp_path / "wl", 2)
    write_kv(tmp_path / "kv", 2)
    trace, _ = imported_trace(tmp_path)
    for path in (tmp_path / "wl", tmp_path / "kv", trace):
        raw = json.loads((path / MANIFEST).read_text())
        assert list(raw)[-1] == "manifest_sha256" and raw["schema_version"] == 3
        assert raw["manifest_sha256"] == manifest_sha256(raw)  # docs/traces.md's definition
        assert raw["manifest_sha256"] != manifest_sha256({**raw, "complete": not raw["complete"]})


# Edits that keep every field typed and in range, so only the checksum can catch them.
MEANINGFUL_EDITS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("architecture", lambda m: m["model"].update(architecture="MlamaForCausalLM")),
    ("model dtype", lambda m: m["model"].update(dtype="float32")),
    ("sketch seed", lambda m: m["sketch"].update(seed=m["sketch"]["seed"] + 1)),
    ("source", lambda m: m["source"].update(generator="someone else")),
    ("capture", lambda m: m["capture"].update(backend="vllm")),
    ("complete", lambda m: m.update(complete=False)),
    ("tool version", lambda m: m.update(tool_version="0.0.1")),
    ("a new field", lambda m: m.update(note="x")),
    ("hash block size", lambda m: m.update(hash_block_size=16)),
    ("a new number in source", lambda m: m["source"].update(rows=2.0)),
    ("checksum removed", lambda m: m.pop("manifest_sha256")),
    ("checksum of another manifest", lambda m: m.update(manifest_sha256="0" * 64)),
    ("checksum not hex", lambda m: m.update(manifest_sha256="checksum")),
]


@pytest.mark.parametrize(("name", "edit"), MEANINGFUL_EDITS, ids=[n for n, _ in MEANINGFUL_EDITS])
def test_a_changed_manifest_is_refused_by_every_reader(
    name: str, edit: Callable[[dict[str, Any]], Any], tmp_path: Path
) -> None:
    path = tmp_path / "t"
    write_kv(path, 2)
    edit_manifest(path, edit, sign=False)
    where = str(path / MANIFEST)
    for read in (
        lambda: TraceReader(path),
        lambda: TraceReader(path, verify=False),
        lambda: TraceWriter.resume(path),
        lambda: TraceWriter.resume(path, template=kv_template()),
    ):
        with pytest.raises(InputError, match="manifest_sha256") as e:
            read()
        assert e.value.where == where, (name, str(e.value))
    res = memshare("inspect", str(path))
    assert_one_line_error(res, where, "manifest_sha256", "re-create the trace")


def test_a_reformatted_manifest_of_the_same_content_is_accepted(tmp_path: Path) -> None:
    # The checksum is over canonical JSON: key order, white space and escapes are not content.
    path = tmp_path / "t"
    write_kv(path, 2)
    before = TraceReader(path).manifest
    raw = json.loads((path / MANIFEST).read_text())
    reordered = dict(reversed(list(raw.items())))
    reordered["model"] = dict(reversed(list(raw["model"].items())))
    (path / MANIFEST).write_text(json.dumps(reordered, separators=(",", ":"), ensure_ascii=False))
    assert TraceReader(path).manifest == before
    (path / MANIFEST).write_text(json.dumps(raw, indent=7).replace('"kv"', '"\\u006bv"'))
    assert TraceReader(path).manifest == before


def test_a_trace_from_before_the_manifest_checksum_is_refused_with_its_fix(tmp_path: Path) -> None:
    trace, src = imported_trace(tmp_path)
    edit_manifest(
        trace, lambda m: (m.pop("manifest_sha256"), m.update(schema_version=2)), sign=False
    )
    fix = (
        f"delete {trace} and re-import it: memshare import mooncake {src.name} --limit 4 -o {trace}"
    )
    for cmd in ("inspect", "simulate"):
        res = memshare(cmd, str(trace))
        assert_one_line_error(res, f"{trace / MANIFEST}: schema version 2", "manifest_sha256", fix)


def test_an_imported_trace_is_re_imported_and_a_capture_re_captured(tmp_path: Path) -> None:
    # Issue 27: "re-capture" was advised for a changed requests.jsonl of an imported trace.
    trace, src = imported_trace(tmp_path)
    fix = f"re-import it: memshare import mooncake {src.name} --limit 4 -o {trace}"
    edit_manifest(trace, lambda m: m.update(hash_block_size=256), sign=False)
    for cmd in ("inspect", "simulate"):
        res = memshare(cmd, str(trace))
        assert_one_line_error(res, f"{trace / MANIFEST}: checksum mismatch", fix)
        assert "re-capture" not in res.stderr
    edit_manifest(trace, lambda m: m.update(hash_block_size=512))  # signed again: readable
    assert TraceReader(trace).manifest.hash_block_size == 512
    _flip_byte(trace / REQUESTS, 40)
    for cmd in ("inspect", "simulate"):
        res = memshare(cmd, str(trace))
        assert_one_line_error(res, f"{trace / REQUESTS}: checksum mismatch", fix)
        assert "re-capture" not in res.stderr
    cap = tmp_path / "cap"
    with TraceWriter(cap, replace(kv_template(), capture={"tool": "memshare capture"})) as w:
        write_requests(w, range(2))
    edit_manifest(cap, lambda m: m["sketch"].update(dim=16), sign=False)
    for res in (memshare("inspect", str(cap)), memshare("capture", "-o", str(cap), "--resume")):
        assert_one_line_error(res, f"{cap / MANIFEST}: checksum mismatch", "re-capture it")


def test_prefix_reuse_names_why_it_has_no_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 27: "no block identity" was said for a trace of token ids whose prompts were only
    # shorter than one block; a trace without token or hash ids still has none.
    monkeypatch.setenv("COLUMNS", "250")  # one table row per line
    src = tmp_path / "ids.jsonl"
    src.write_text('{"prompt_token_ids": [1, 2, 3, 4, 5]}\n{"prompt_token_ids": [1, 2, 3, 4, 6]}\n')
    ids = tmp_path / "ids"
    assert memshare("import", "tokens", str(src), "-o", str(ids), "--json").returncode == 0
    res = memshare("inspect", str(ids))
    assert res.returncode == 0 and "block identity" not in res.stdout, res.stdout
    assert "no prompt fills a block of 16 tokens (the longest has 5); pass --block-size 5" in (
        res.stdout
    )
    reuse = json.loads(memshare("inspect", str(ids), "--json").stdout)["prefix_reuse"]
    assert reuse["prompt_blocks"] == 0 and reuse["block_size"] == 16
    reuse = json.loads(memshare("inspect", str(ids), "--block-size", "4", "--json").stdout)
    assert reuse["prefix_reuse"]["hit_blocks"] == 1  # the shared first block of 4 ids
    bare = tmp_path / "bare"
    with TraceWriter(bare, replace(workload_template(), hash_block_size=None)) as w:
        w.add(replace(workload_record(0), hash_ids=None))
    res = memshare("inspect", str(bare))
    assert res.returncode == 0 and "no block identity (token or hash ids)" in res.stdout
    assert json.loads(memshare("inspect", str(bare), "--json").stdout)["prefix_reuse"] is None
