"""Issue 11, defect 6 and the rest of its classes: every bad command line is one line on
stderr and exit 2, never a traceback; numpy never warns on the screen.

Real files and the real CLI (``memshare.cli.main`` in process, so a traceback is an
exception here; a few subprocess runs where process-wide state matters). No mocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from test_hardening import smol_kv_trace

from memshare.cli import main
from memshare.traces.model.device import resolve_threads

MOONCAKE_DEMO = Path(__file__).resolve().parents[1] / "memshare" / "data" / "mooncake_demo.jsonl"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``memshare ARGS`` in process: (exit status, stdout, stderr). Any exception other than
    SystemExit (a traceback for the user) and any warning fail the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(result: tuple[int, str, str], *needles: str) -> None:
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("memshare: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    f: dict[str, Path] = {"root": root, "kv": smol_kv_trace(root / "kv")}
    f["binary"] = root / "binary.jsonl"
    f["binary"].write_bytes(bytes(range(255, -1, -1)) * 8)
    f["binary_txt"] = root / "binary.txt"
    f["binary_txt"].write_bytes(b"\xff\xfe\x00garbage" * 10)
    f["binary_toml"] = root / "binary.toml"
    f["binary_toml"].write_bytes(b"\x8c\xff" * 50)
    f["file"] = root / "a-file"
    f["file"].write_text("not a folder\n")
    f["empty_text"] = root / "empty_text.jsonl"
    f["empty_text"].write_text('{"problem": "2+2?", "reasoning": ""}\n')
    f["later_empty"] = root / "later_empty.jsonl"
    f["later_empty"].write_text('{"reasoning": "so 4"}\n{"reasoning": "   "}\n')
    f["empty_prompt"] = root / "empty_prompt.jsonl"
    f["empty_prompt"].write_text('{"question": ""}\n')
    f["far_apart"] = root / "far_apart.jsonl"  # 2e305 s between two arrivals
    f["far_apart"].write_text(
        '{"timestamp": -1e308, "input_length": 6, "output_length": 8, "hash_ids": [0]}\n'
        '{"timestamp": 1e308, "input_length": 6, "output_length": 8, "hash_ids": [0]}\n'
    )
    return f


def test_binary_input_files_are_named_not_a_traceback(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(files["root"] / "never")
    binary = str(files["binary"])
    for option in ("--dataset", "--texts"):
        res = run_cli(capsys, "capture", "-o", out, option, binary)
        assert_refused(res, f"{binary}:1", "not UTF-8", option)
    assert_refused(
        run_cli(capsys, "capture", "-o", out, "--texts", str(files["binary_txt"])),
        str(files["binary_txt"]),
        "not UTF-8",
    )
    assert_refused(
        run_cli(capsys, "calibrate", "-o", out + ".json", "--texts", binary), "not UTF-8"
    )
    assert not Path(out).exists()


@pytest.mark.parametrize("command", ["capture", "calibrate"])
def test_cuda_without_cuda_is_one_line(
    command: str, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # asked here, not at collection: importing torch in a process of its own cost every run
    if pytest.importorskip("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = files["root"] / f"cuda-{command}"
    target = str(out) + (".json" if command == "calibrate" else "")
    res = run_cli(capsys, command, "-o", target, "--device", "cuda", "--limit", "1")
    assert_refused(res, "--device", "no CUDA device", "use cpu")
    assert not Path(target).exists()


@pytest.mark.parametrize("command", ["capture", "calibrate"])
def test_unknown_device_is_one_line(
    command: str, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    target = str(files["root"] / f"tpu-{command}")
    res = run_cli(capsys, command, "-o", target, "--device", "tpu", "--limit", "1")
    assert_refused(res, "--device", "'tpu'")


def test_empty_text_field_is_called_empty(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(files["root"] / "never")
    res = run_cli(capsys, "capture", "-o", out, "--texts", str(files["empty_text"]))
    assert_refused(res, f"{files['empty_text']}:1", "'reasoning' is empty")
    assert "no text field found" not in res[2]
    res = run_cli(capsys, "capture", "-o", out, "--texts", str(files["later_empty"]))
    assert_refused(res, f"{files['later_empty']}:2", "'reasoning'", "is empty")
    res = run_cli(capsys, "capture", "-o", out, "--dataset", str(files["empty_prompt"]))
    assert_refused(res, "'question' is empty")


def test_missing_layer_map_file_is_named_as_a_file(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    kv = str(files["kv"])
    res = run_cli(
        capsys, "simulate", kv, "--policy", "kvsharer", "--set", "layer_map_file=/nonexistent"
    )
    assert_refused(res, "layer_map_file /nonexistent", "does not exist", "memshare calibrate")
    res = run_cli(
        capsys, "simulate", kv, "--policy", "kvsharer", "--set", f"layer_map_file={files['root']}"
    )
    assert_refused(res, "layer_map_file", "cannot be read")
    res = run_cli(capsys, "simulate", kv, "--policy", "kvsharer")
    assert_refused(res, "--set layer_map_file", "needs a calibrated layer map")


def bad_command_lines(f: dict[str, Path]) -> list[tuple[list[str], list[str]]]:
    """(argv, needles) over every command: outputs where a file is, binary and empty inputs,
    bad devices and thread counts, non-finite and absurd numbers."""
    kv, file, root = str(f["kv"]), str(f["file"]), f["root"]
    under_file = str(f["file"] / "x")
    never = str(root / "never")
    sweep_out = str(root / "sweep")  # refused before the first value runs: nothing written
    cases: list[tuple[list[str], list[str]]] = [
        # an output path that exists as a file, or lies under one
        (["capture", "-o", file, "--limit", "1"], ["-o", "not a folder"]),
        (["capture", "-o", under_file, "--limit", "1"], ["-o", "is a file, not a folder"]),
        (["simulate", kv, "-o", file], ["-o", "not a folder"]),
        (["simulate", kv, "-o", under_file, "--plot"], ["-o", "is a file"]),
        (["sweep", kv, "kv_blocks=10,20", "-o", file], ["-o"]),
        (["study", kv, "-o", file], ["-o", "not a folder"]),
        (["study", kv, "-o", under_file], ["-o", "is a file"]),
        (["import", "mooncake", str(MOONCAKE_DEMO), "-o", file], ["-o"]),
        (["import", "mooncake", str(MOONCAKE_DEMO), "-o", under_file], ["-o", "is a file"]),
        (["calibrate", "-o", str(root)], ["-o", "is a folder"]),
        (["calibrate", "-o", under_file], ["-o", "is a file"]),
        (["generate", "-o", file, "--texts", str(f["later_empty"])], ["-o"]),
        (["demo", "-o", file, "--workload"], ["-o", "not a folder"]),
        (["inspect", kv, "--similarity", "--plot", under_file], ["--plot", "is a file"]),
        # binary and empty inputs
        (["capture", "-o", never, "--dataset", str(f["binary"])], ["not UTF-8"]),
        (["import", "azure", str(f["binary"]), "-o", never], ["UTF-8"]),
        (["import", "mooncake", str(f["far_apart"]), "-o", never], [":2", "timestamps span"]),
        (["simulate", kv, "--gpu", str(f["binary_toml"])], ["--gpu"]),
        (["simulate", kv, "--cost-model", str(f["binary_toml"])], ["--cost-model"]),
        (["simulate", kv, "--cost-model", str(root)], ["--cost-model"]),
        (["simulate", file], [file]),
        (["inspect", str(f["binary"])], [str(f["binary"])]),
        (["calibrate", "-o", never + ".json", "--texts", str(f["empty_text"])], ["is empty"]),
        # devices and threads
        (["capture", "-o", never, "--device", "cuda:x"], ["--device"]),
        (["capture", "-o", never, "--threads", "0"], ["--threads"]),
        (["calibrate", "-o", never + ".json", "--threads", "-2"], ["--threads"]),
        # non-finite and absurd numbers
        (["simulate", kv, "--kv-blocks", "nan"], ["--kv-blocks"]),
        (["simulate", kv, "--kv-blocks", "-inf"], ["--kv-blocks"]),
        (["simulate", kv, "--kv-blocks", "1e400"], ["--kv-blocks"]),
        (["simulate", kv, "--kv-blocks", "0"], ["--kv-blocks"]),
        (["simulate", kv, "--kv-bytes", "nan"], ["--kv-bytes"]),
        (["simulate", kv, "--kv-bytes", "inf"], ["--kv-bytes"]),
        (["simulate", kv, "--time-scale", "1e308"], ["--time-scale"]),
        (["simulate", kv, "--time-scale", "inf"], ["--time-scale"]),
        (["simulate", kv, "--arrival", "poisson:1e-308"], ["--arrival"]),
        (["simulate", kv, "--arrival", "poisson:-1"], ["--arrival"]),
        (["simulate", kv, "--arrival", "closed:0"], ["--arrival"]),
        (["simulate", kv, "--sweep", "kv_blocks=nan,inf"], ["--kv-blocks"]),
        (["simulate", kv, "--sweep", "time_scale=1,1e308", "-o", sweep_out], ["--time-scale"]),
        (["simulate", kv, "--max-num-batched-tokens", "0"], ["--max-num-batched-tokens"]),
        (["simulate", kv, "--limit", "0"], ["--limit"]),
        (["simulate", kv, "--block-size", "99999999999999"], ["--block-size"]),
        (["study", kv, "--tau", "nan", "-o", never], ["tau"]),
        (["study", kv, "--kv-blocks", "nan", "-o", never], ["--kv-blocks"]),
        (["inspect", kv, "--block-size", "0"], ["--block-size"]),
        (["bench", "policy", "--resident-blocks", "99999999999999999999"], ["--resident-blocks"]),
        (["bench", "sim", "--sizes", "99999999999"], ["--sizes"]),
        (["bench", "sim", "--steps", "-1"], ["--steps"]),
        (["import", "mooncake", str(MOONCAKE_DEMO), "-o", never, "--limit", "-3"], ["limit"]),
    ]
    return cases


def test_bad_command_lines_are_one_line_refusals(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(files["root"])  # default outputs (runs/...) would land here
    cases = bad_command_lines(files)
    failures = []
    for args, needles in cases:
        code, _, err = run_cli(capsys, *args)
        lines = err.strip().splitlines()
        ok = (
            code == 2
            and len(lines) == 1
            and lines[0].startswith("memshare: error: ")
            and all(n in lines[0] for n in needles)
        )
        if not ok:
            failures.append((args, code, err))
    assert not failures, "\n".join(f"{a} -> {c}: {e!r}" for a, c, e in failures)
    assert not (files["root"] / "never").exists()
    assert not (files["root"] / "runs").exists()  # a refusal writes nothing


def test_huge_budgets_run_without_numpy_warnings(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 11 item 5: numpy overflow warnings reached the screen; run_cli turns any warning
    # into a failure. Huge but meaningful values run; 'inf' is unlimited by design.
    kv, out = str(files["kv"]), str(files["root"] / "huge")
    for extra in (
        ["--kv-blocks", "99999999999999999999999"],
        ["--kv-blocks", "inf"],
        ["--kv-bytes", "1e300"],
        ["--max-num-seqs", "99999999999999999999"],
        ["--max-num-batched-tokens", "99999999999999999999"],
        ["--arrival", "poisson:1e300"],
    ):
        code, stdout, err = run_cli(
            capsys, "simulate", kv, "-o", out, "--overwrite", "--json", *extra
        )
        assert code == 0, (extra, err)
        assert json.loads(stdout)["runs"][0]["metrics"]["requests"]["finished"] == 6
    # every request too large for the budget: plots without data draw no legend warnings
    code, stdout, err = run_cli(
        capsys, "simulate", kv, "-o", out, "--overwrite", "--kv-blocks", "1", "--plot"
    )
    assert code == 0, err
    code, stdout, _ = run_cli(capsys, "simulate", "--help")
    assert "'inf'" in stdout and "never evicts" in stdout


def test_thread_count_from_the_environment_is_checked_before_torch_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None) == 3
    assert resolve_threads(1) == 1  # --threads wins
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert resolve_threads(None) is None  # torch's own default
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    res = subprocess.run(
        [sys.executable, "-m", "memshare.cli", "capture", "-o", "/nonexistent/x", "--limit", "1"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "lots"},
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "OMP_NUM_THREADS" in lines[0] and "--threads" in lines[0], lines


def test_zero_output_requests_are_flagged_on_import_and_counted_as_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 11 item 7 / follow-up: a 0-output request was simulated as 1 output token silently.
    # It is kept (its prefill is real work), flagged on import, served as prefill + the 1 token
    # that step samples, and counted as 0 output tokens.
    src = tmp_path / "mc.jsonl"
    src.write_text(
        '{"timestamp": 0, "input_length": 600, "output_length": 8, "hash_ids": [0, 1]}\n'
        '{"timestamp": 5, "input_length": 600, "output_length": 0, "hash_ids": [0, 2]}\n'
    )
    code, _, err = run_cli(capsys, "import", "mooncake", str(src), "-o", str(tmp_path / "t"))
    assert code == 0, err
    assert "1 rows have 0 output tokens" in err and "counts 0 output tokens" in err
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["source"]["zero_output_rows"] == 1
    code, stdout, err = run_cli(
        capsys, "simulate", str(tmp_path / "t"), "--policy", "none", "-o", str(tmp_path / "r")
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["requests"]["finished"] == 2
    assert metrics["requests"]["output_tokens"] == 8  # not 9
    assert metrics["requests"]["zero_output_served_as_1"] == 1
    rows = (tmp_path / "r" / "requests.csv").read_text().splitlines()
    assert rows[2].split(",")[3] == "0"  # output_len of the prompt-only request
    # a trace without such requests: no note, no key (every other run's files unchanged)
    src.write_text('{"timestamp": 0, "input_length": 600, "output_length": 8, "hash_ids": [0]}\n')
    code, _, err = run_cli(capsys, "import", "mooncake", str(src), "-o", str(tmp_path / "ok"))
    assert code == 0 and "output tokens" not in err, err
    code, stdout, err = run_cli(
        capsys, "simulate", str(tmp_path / "ok"), "--json", "-o", str(tmp_path / "r2")
    )
    assert code == 0, err
    assert "zero_output_served_as_1" not in json.loads(stdout)["runs"][0]["metrics"]["requests"]
