"""Issue 11, for the user: a KV budget beyond the GPU preset's memory gets a one-line warning
on stderr (never on stdout: ``--json`` stays one JSON object), and a run says which model and
GPU presets it used. Real traces, the real CLI in process; no mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli_fuzz import run_cli
from test_hardening import smol_kv_trace

MOONCAKE_DEMO = Path(__file__).resolve().parents[1] / "memshare" / "data" / "mooncake_demo.jsonl"


@pytest.fixture(scope="module")
def mc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("budget")
    src = root / "mc.jsonl"
    src.write_text("".join(MOONCAKE_DEMO.read_text().splitlines(keepends=True)[:10]))
    from memshare.traces.importers import import_workload

    import_workload("mooncake", src, root / "mc")
    return root / "mc"


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("memshare: warning: ")]


def test_oversized_budget_warns_once_on_stderr_and_json_stays_clean(
    mc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Mooncake blocks are 512 tokens of llama-3.1-8b (64 MiB): 20,000 blocks are 1,250 GiB.
    code, out, err = run_cli(
        capsys, "simulate", str(mc), "--policy", "none", "--policy", "prefix",
        "--kv-blocks", "20000", "--json", "-o", str(tmp_path / "r"),
    )  # fmt: skip
    assert code == 0, err
    runs = json.loads(out)["runs"]  # stdout is exactly one JSON object
    assert [r["policy"] for r in runs] == ["none", "prefix"]
    (line,) = warnings_in(err)  # once, though two policies ran
    for needle in ("--kv-blocks", "20,000 blocks", "1,250.0 GiB", "llama-3.1-8b", "80 GiB", "h100"):
        assert needle in line, (needle, line)
    cfg = json.loads((tmp_path / "r" / "none" / "config.json").read_text())["config"]
    assert (cfg["model"]["name"], cfg["gpu"]["name"]) == ("llama-3.1-8b", "h100")

    code, out, err = run_cli(
        capsys, "simulate", str(mc), "--policy", "none", "--kv-bytes", "200GiB",
        "--gpu", "h200", "-o", str(tmp_path / "b"),
    )  # fmt: skip
    assert code == 0, err
    (line,) = warnings_in(err)
    assert "--kv-bytes" in line and "141 GiB" in line and "h200" in line, line
    assert "llama-3.1-8b on h200" in out  # the table title names the presets


@pytest.mark.parametrize(
    "budget", [["--kv-blocks", "100"], ["--kv-bytes", "40GiB"], [], ["--kv-blocks", "unlimited"]]
)
def test_fitting_default_or_unlimited_budget_does_not_warn(
    budget: list[str], mc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        capsys, "simulate", str(mc), "--policy", "none", *budget, "-o", str(tmp_path / "r")
    )
    assert code == 0, err
    assert not warnings_in(err), err
    assert "memshare simulate: llama-3.1-8b on h100" in out


def test_sweep_and_study_share_the_warning(
    mc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(
        capsys, "sweep", str(mc), "kv_blocks=100,20000,30000", "--policy", "none",
        "--json", "-o", str(tmp_path / "s"),
    )  # fmt: skip
    assert code == 0, err
    json.loads(out)
    lines = warnings_in(err)
    assert len(lines) == 2 and "20,000 blocks" in lines[0] and "30,000 blocks" in lines[1], err

    kv = smol_kv_trace(tmp_path / "kv")  # SmolLM2: 90 KiB per 4-token block
    code, out, err = run_cli(
        capsys, "study", str(kv), "--tau", "0.5", "--kv-blocks", "10000000",
        "--json", "-o", str(tmp_path / "st"),
    )  # fmt: skip
    assert code == 0, err
    json.loads(out)
    (line,) = warnings_in(err)
    assert "10,000,000 blocks" in line and "smollm2-135m" in line and "h100" in line, line
    code, out, err = run_cli(capsys, "study", str(kv), "--tau", "0.5", "-o", str(tmp_path / "u"))
    assert code == 0 and not warnings_in(err), err


@pytest.mark.parametrize(
    ("keys", "policy", "warns"),
    [
        ("post_rope", "cf-topk", True),
        ("post_rope", "exact-dedup", True),
        ("post_rope", "prefix+cf-topk", True),  # a member compares keys
        ("post_rope", "none", False),
        ("post_rope", "prefix", False),
        ("post_rope", "token-dedup", False),  # compares token ids, not keys
        ("pre_rope", "cf-topk", False),
        ("pre_rope", "exact-dedup", False),
    ],
)
def test_a_policy_that_compares_keys_warns_on_post_rope_keys(
    keys: str, policy: str, warns: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 28: on a trace of post-RoPE keys, a policy judging keys finds next to nothing to
    share, and the simulator says why and what to do, once, on stderr."""
    kv = smol_kv_trace(tmp_path / "kv", keys=keys)  # type: ignore[arg-type]
    flags = [f for p in dict.fromkeys([policy, "none"]) for f in ("--policy", p)]
    code, out, err = run_cli(
        capsys, "simulate", str(kv), *flags, "--json", "-o", str(tmp_path / "r")
    )
    assert code == 0, err
    json.loads(out)  # stdout stays one JSON object
    lines = warnings_in(err)
    if not warns:
        assert not lines, err
        return
    (line,) = lines
    for needle in (str(kv), policy, "post-RoPE", "sketch.keys", "--keys pre_rope", "0.01%"):
        assert needle in line, (needle, line)


def test_study_warns_once_on_post_rope_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kv = smol_kv_trace(tmp_path / "kv", keys="post_rope")
    code, out, err = run_cli(
        capsys, "study", str(kv), "--tau", "0.5", "--json", "-o", str(tmp_path / "st")
    )
    assert code == 0, err
    json.loads(out)
    lines = warnings_in(err)
    # one line per policy that compares keys, however many cf-topk settings the study runs
    assert sorted(line.split(": ")[3].split()[0] for line in lines) == ["cf-topk", "exact-dedup"]
