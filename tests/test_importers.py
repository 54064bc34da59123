"""Workload importers: real Mooncake and Azure files, the BurstGPT fixture, and bad input."""

from __future__ import annotations

import csv
import hashlib
import json
from datetime import datetime, timedelta
from fractions import Fraction
from pathlib import Path

import pytest

from memshare.errors import InputError
from memshare.traces.importers import IMPORTERS, import_workload
from memshare.traces.importers.azure import parse_timestamp_ns
from memshare.traces.reader import TraceReader
from memshare.traces.schema import Manifest, RequestRecord

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORKLOADS = DATA / "workloads"
MOONCAKE = WORKLOADS / "mooncake_synthetic_trace.jsonl"
AZURE_CODE = WORKLOADS / "azure_llm_2023_code.csv"
AZURE_CONV = WORKLOADS / "azure_llm_2023_conv.csv"
BURSTGPT = Path(__file__).resolve().parent / "fixtures" / "burstgpt_small.csv"

needs_data = pytest.mark.skipif(not WORKLOADS.is_dir(), reason=f"no shared data at {WORKLOADS}")


def _import(fmt: str, src: Path, tmp_path: Path, **kw: object) -> tuple[Manifest, TraceReader]:
    out = tmp_path / f"{fmt}-trace"
    manifest = import_workload(fmt, src, out, **kw)  # type: ignore[arg-type]
    reader = TraceReader(out)
    assert reader.manifest == manifest
    return manifest, reader


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_common(manifest: Manifest, records: list[RequestRecord], fmt: str, src: Path) -> None:
    """What every imported trace must satisfy."""
    assert manifest.kind == "workload"
    assert manifest.block_size == 16
    assert manifest.complete
    assert manifest.model is None and manifest.shards == ()
    assert manifest.counts.requests == len(records)
    assert manifest.counts.prompt_tokens == sum(r.prompt_len for r in records)
    assert manifest.source["format"] == fmt
    assert manifest.source["file"] == src.name
    assert manifest.source["sha256"] == _sha256(src)
    assert manifest.source["rows"] == len(records)
    assert records[0].arrival_s == 0.0
    arrivals = [r.arrival_s for r in records]
    assert arrivals == sorted(arrivals)


# --- Mooncake -------------------------------------------------------------------------------


@needs_data
def test_mooncake_real_file(tmp_path: Path) -> None:
    manifest, reader = _import("mooncake", MOONCAKE, tmp_path)
    records = reader.records()
    rows = [json.loads(line) for line in MOONCAKE.read_text().splitlines()]
    assert len(records) == len(rows) == 3993
    _check_common(manifest, records, "mooncake", MOONCAKE)
    assert manifest.hash_block_size == 512
    assert manifest.source["hash_ids_length_mismatches"] == 0
    assert manifest.source["in_arrival_order"] is True
    assert rows[0]["timestamp"] == 0
    for k, (rec, row) in enumerate(zip(records, rows, strict=True)):
        assert rec.id == f"mooncake-{k:06d}"
        assert rec.arrival_s == row["timestamp"] / 1000
        assert rec.prompt_len == row["input_length"]
        assert rec.output_len == row["output_length"]
        assert rec.hash_ids == row["hash_ids"]
    assert records[-1].arrival_s == 1022.025


@needs_data
def test_mooncake_limit_and_progress(tmp_path: Path) -> None:
    seen: list[int] = []
    manifest, reader = _import("mooncake", MOONCAKE, tmp_path, limit=2500, progress=seen.append)
    assert len(reader) == 2500 == manifest.counts.requests
    assert manifest.source["limit"] == 2500
    assert seen == [1000, 2000, 2500]


def test_unsorted_rows_are_sorted_stably(tmp_path: Path) -> None:
    src = tmp_path / "unsorted.jsonl"
    times = [1000, 3000, 2000, 2000, 500]
    src.write_text(
        "".join(
            json.dumps(
                {"timestamp": t, "input_length": 10 + k, "output_length": 1, "hash_ids": [k]}
            )
            + "\n"
            for k, t in enumerate(times)
        )
    )
    manifest, reader = _import("mooncake", src, tmp_path)
    assert [r.id for r in reader] == [f"mooncake-{k:06d}" for k in (4, 0, 2, 3, 1)]
    assert [r.arrival_s for r in reader] == [0.0, 0.5, 1.5, 1.5, 2.5]
    assert manifest.source["in_arrival_order"] is False
    assert manifest.source["out_of_order_rows"] == 2


# --- Azure ----------------------------------------------------------------------------------


def _ticks(text: str) -> tuple[datetime, int]:
    """Independent parse: datetime to the microsecond, plus the 7th digit (100 ns ticks)."""
    head, frac = text.split(".")
    return datetime.strptime(f"{head}.{frac[:6]}", "%Y-%m-%d %H:%M:%S.%f"), int(frac[6:] or 0)


def _offset_s(first: str, last: str) -> float:
    (d0, t0), (d1, t1) = _ticks(first), _ticks(last)
    ticks = (d1 - d0) // timedelta(microseconds=1) * 10 + (t1 - t0)
    return ticks / 10**7


@needs_data
@pytest.mark.parametrize(
    ("src", "n", "second"),
    [(AZURE_CODE, 8819, 0.052), (AZURE_CONV, 19366, 4.314579)],
    ids=["code", "conv"],
)
def test_azure_real_files(tmp_path: Path, src: Path, n: int, second: float) -> None:
    manifest, reader = _import("azure", src, tmp_path)
    records = reader.records()
    with src.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(records) == len(rows) == n
    _check_common(manifest, records, "azure", src)
    assert manifest.hash_block_size is None
    assert manifest.source["time_origin"] == rows[0]["TIMESTAMP"]
    assert records[0].arrival_s == 0.0
    assert records[1].arrival_s == second
    assert records[1].arrival_s == _offset_s(rows[0]["TIMESTAMP"], rows[1]["TIMESTAMP"])
    assert records[-1].arrival_s == _offset_s(rows[0]["TIMESTAMP"], rows[-1]["TIMESTAMP"])
    for k, (rec, row) in enumerate(zip(records, rows, strict=True)):
        assert rec.id == f"azure-{k:06d}"
        assert rec.prompt_len == int(row["ContextTokens"])
        assert rec.output_len == int(row["GeneratedTokens"])
        assert rec.hash_ids is None


def test_azure_timestamp_parse_is_exact() -> None:
    a = parse_timestamp_ns("2023-12-31 23:59:59.9999999")
    b = parse_timestamp_ns("2024-01-01 00:00:00.0000001")
    c = parse_timestamp_ns("2024-01-01T00:00:01.123456789")
    d = parse_timestamp_ns("2024-01-01 00:00:02")
    assert a is not None and b is not None and c is not None and d is not None
    assert b - a == 200
    assert c - b == 1_123_456_689
    assert d - b == 1_999_999_900
    for bad in ("2023-02-30 00:00:00", "2023-11-16 24:00:00", "2023-11-16", "yesterday"):
        assert parse_timestamp_ns(bad) is None


# --- BurstGPT -------------------------------------------------------------------------------


def test_burstgpt_fixture_round_trip(tmp_path: Path) -> None:
    manifest, reader = _import("burstgpt", BURSTGPT, tmp_path)
    records = reader.records()
    with BURSTGPT.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(records) == len(rows) == 30
    _check_common(manifest, records, "burstgpt", BURSTGPT)
    assert manifest.hash_block_size is None
    assert manifest.source["failed_rows"] == 2
    assert manifest.source["total_tokens_mismatches"] == 0
    t0 = Fraction(rows[0]["Timestamp"])
    for k, (rec, row) in enumerate(zip(records, rows, strict=True)):
        assert rec.id == f"burstgpt-{k:06d}"
        assert rec.arrival_s == float(Fraction(row["Timestamp"]) - t0)
        assert rec.prompt_len == int(row["Request tokens"])
        assert rec.output_len == int(row["Response tokens"])
        failed = row["Response tokens"] == "0"
        assert rec.meta == {"model": row["Model"], "log_type": row["Log Type"], "failed": failed}
    assert sum(1 for r in records if r.meta and r.meta["failed"]) == 2


def test_burstgpt_blank_lines_crlf_and_extra_columns(tmp_path: Path) -> None:
    src = tmp_path / "b.csv"
    src.write_bytes(
        b"Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type,Extra\r\n"
        b"0.5,GPT-4,10,2,12,API log,x\r\n"
        b"\r\n"
        b"1.75,ChatGPT,20,0,20,Conversation log,y\r\n"
    )
    _, reader = _import("burstgpt", src, tmp_path)
    assert [r.arrival_s for r in reader] == [0.0, 1.25]
    assert [r.meta for r in reader] == [
        {"model": "GPT-4", "log_type": "API log", "failed": False},
        {"model": "ChatGPT", "log_type": "Conversation log", "failed": True},
    ]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(src.read_bytes() + b"\r\n2,ChatGPT,x,1,1,API log,z\r\n")
    with pytest.raises(InputError) as e:
        import_workload("burstgpt", bad, tmp_path / "bad-out")
    assert f"{bad}:6:" in str(e.value) and "data row 3" in str(e.value)


def test_registry() -> None:
    assert set(IMPORTERS) == {"mooncake", "azure", "burstgpt", "tokens"}
    assert IMPORTERS["mooncake"].hash_block_size == 512


# --- Bad input ------------------------------------------------------------------------------

_MC_OK = '{"timestamp": 0, "input_length": 600, "output_length": 8, "hash_ids": [0, 1]}\n'
_AZ_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
_AZ_OK = "2023-11-16 18:17:03.9799600,4808,10\n"
_BG_HEAD = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
_BG_OK = "5,ChatGPT,472,18,490,Conversation log\n"

# (format, file text, line, words the message must hold besides file and line)
BAD_INPUTS = {
    "jsonl_not_json": ("mooncake", _MC_OK + _MC_OK + '{"timestamp": 1,\n', 3, ["not valid JSON"]),
    "jsonl_not_object": ("mooncake", _MC_OK + "[1, 2]\n", 2, ["not an object"]),
    "jsonl_missing_field": (
        "mooncake",
        _MC_OK + '{"timestamp": 5, "input_length": 600, "hash_ids": [0]}\n',
        2,
        ["'output_length'", "missing"],
    ),
    "jsonl_non_integer": (
        "mooncake",
        _MC_OK + '\n{"timestamp": 5, "input_length": "600", "output_length": 1, "hash_ids": []}\n',
        3,
        ["'input_length'", "'600'"],
    ),
    "jsonl_float_length": (
        "mooncake",
        '{"timestamp": 5, "input_length": 6, "output_length": 1.5, "hash_ids": []}\n',
        1,
        ["'output_length'", "1.5"],
    ),
    "jsonl_bad_hash_id": (
        "mooncake",
        _MC_OK + '{"timestamp": 5, "input_length": 6, "output_length": 1, "hash_ids": [1, "x"]}\n',
        2,
        ["'hash_ids'", "item 1"],
    ),
    "jsonl_bad_timestamp": (
        "mooncake",
        '{"timestamp": "soon", "input_length": 6, "output_length": 1, "hash_ids": []}\n',
        1,
        ["'timestamp'", "milliseconds"],
    ),
    "csv_wrong_column_count": (
        "azure",
        _AZ_HEAD + _AZ_OK + "2023-11-16 18:17:04.0319600,3180\n",
        3,
        ["data row 2", "2 fields", "TIMESTAMP,ContextTokens,GeneratedTokens"],
    ),
    "csv_non_numeric_count": (
        "azure",
        _AZ_HEAD + _AZ_OK + _AZ_OK + "2023-11-16 18:17:05.0000000,many,3\n",
        4,
        ["data row 3", "column 'ContextTokens'", "'many'"],
    ),
    "csv_negative_count": (
        "burstgpt",
        _BG_HEAD + "5,ChatGPT,472,-18,454,Conversation log\n",
        2,
        ["data row 1", "column 'Response tokens'"],
    ),
    "csv_bad_timestamp": (
        "azure",
        _AZ_HEAD + "16/11/2023 18:17,4808,10\n",
        2,
        ["data row 1", "column 'TIMESTAMP'", "2023-11-16 18:17:03.9799600"],
    ),
    "csv_bad_burstgpt_timestamp": (
        "burstgpt",
        _BG_HEAD + _BG_OK + "nan,ChatGPT,1,1,2,API log\n",
        3,
        ["data row 2", "column 'Timestamp'"],
    ),
    "csv_missing_column": (
        "azure",
        "TIMESTAMP,ContextTokens,OutputTokens\n" + _AZ_OK,
        1,
        ["'GeneratedTokens'", "TIMESTAMP,ContextTokens,GeneratedTokens"],
    ),
    "csv_missing_column_burstgpt": (
        "burstgpt",
        "Timestamp,Model,Request tokens,Response tokens\n5,ChatGPT,1,1\n",
        1,
        ["'Total tokens'", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"],
    ),
    "csv_not_utf8": (
        "azure",
        _AZ_HEAD + _AZ_OK + "2023-11-16 18:17:05.0,\udcff5,1\n",
        3,
        ["UTF-8"],
    ),
}


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_names_file_line_and_field(tmp_path: Path, case: str) -> None:
    fmt, text, line, words = BAD_INPUTS[case]
    src = tmp_path / f"{case}.src"
    _write(src, text)
    out = tmp_path / "out"
    with pytest.raises(InputError) as e:
        import_workload(fmt, src, out)
    message = str(e.value)
    assert message.startswith(f"{src}:{line}: "), message
    for word in words:
        assert word in message, (word, message)
    assert e.value.fix
    assert not out.exists()  # nothing is written before the whole source validated


@pytest.mark.parametrize("fmt", sorted(IMPORTERS))
def test_empty_file(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "empty"
    src.write_bytes(b"")
    with pytest.raises(InputError, match="file is empty") as e:
        import_workload(fmt, src, tmp_path / "out")
    assert str(src) in str(e.value)


@pytest.mark.parametrize(
    ("fmt", "text"), [("mooncake", "\n\n  \n"), ("azure", _AZ_HEAD), ("burstgpt", _BG_HEAD + "\n")]
)
def test_no_data_rows(tmp_path: Path, fmt: str, text: str) -> None:
    src = tmp_path / "blank"
    src.write_text(text)
    with pytest.raises(InputError, match="no requests") as e:
        import_workload(fmt, src, tmp_path / "out")
    assert str(e.value).startswith(str(src))


def test_missing_file(tmp_path: Path) -> None:
    src = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match="does not exist") as e:
        import_workload("mooncake", src, tmp_path / "out")
    assert str(e.value).startswith(str(src))
    with pytest.raises(InputError, match="not a regular file"):
        import_workload("mooncake", tmp_path, tmp_path / "out")


def test_unknown_format_and_bad_limit(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="mooncake, azure, burstgpt"):
        import_workload("sharegpt", BURSTGPT, tmp_path / "out")
    with pytest.raises(InputError, match="limit"):
        import_workload("burstgpt", BURSTGPT, tmp_path / "out", limit=0)


def test_existing_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    import_workload("burstgpt", BURSTGPT, out)
    with pytest.raises(InputError, match="already holds a trace"):
        import_workload("burstgpt", BURSTGPT, out)


def test_a_folder_holding_other_files_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not a trace")
    with pytest.raises(InputError, match=r"is not empty \(notes\.txt\)"):
        import_workload("burstgpt", BURSTGPT, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
