"""Every policy parameter is checked in one place (``memshare.registry.coerce_params``, from
each policy's ``PARAMS`` table) against its real limits, for ``--set``, ``--set POLICY.key``,
a sweep's values, typed values (a TOML file or ``config.json``) and a policy built in Python.

The bad values of each parameter are derived from its declared range (one past each end,
non-finite and overflowing numbers, wrong types, blank text) and driven through the real CLI
in this process: ``simulate`` on a small kv trace, ``generate`` (which must refuse before it
loads the model) and ``sweep``. Each must be one line, exit 2, naming the parameter and the
value given; the edge values that are allowed must still run, with no warning on stderr.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import assert_one_line_error, memshare

from memshare.errors import InputError
from memshare.policies.params import Param
from memshare.registry import (
    COMPOSITIONS,
    check_block_size,
    coerce_params,
    make_policy,
    param_defaults,
    param_specs,
    policy_names,
)

GSM8K = Path(__file__).resolve().parents[1] / "memshare" / "data" / "gsm8k_prompts.jsonl"
MEMBERS = [n for n in policy_names() if "+" not in n]


@pytest.fixture(scope="module")
def layer_map(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lm") / "map.json"
    lm = list(range(30))
    lm[3] = 2
    path.write_text(json.dumps({"layer_map": lm}))
    return path


def bad_values(spec: Param) -> list[str]:
    """Values a parameter of ``spec`` must refuse, as a user would type them."""
    if spec.kind == "choice":
        return ["", "x", spec.choices[0].upper(), ",".join(spec.choices), "1"]
    if spec.kind in ("file", "text"):
        return []  # a path: checked by reading it (test_cli_fuzz, below)
    assert spec.lo is not None and spec.hi is not None  # every number has both bounds
    past = [spec.lo - 1, spec.hi + 1, spec.hi * 10]
    out = [("%d" if spec.kind == "int" else "%r") % v for v in past]
    out += ["", "abc", "nan", "inf", "-inf", "1e400", "-1e400", "true", "1,2"]
    if spec.kind == "int":
        out += ["1.5", "1e3", "0x10", "9" * 5000, str(2**64 + 1)]
    else:
        out += ["1e308", "-1e308", "0.5.5", "1e-400x"]
    return out


def bad_cases() -> list[tuple[str, str, str]]:
    """(policy, key, value) for every parameter of every policy and every bad value."""
    cases = []
    for name in MEMBERS:
        for key, (_, spec) in param_specs(name).items():
            cases += [(name, key, v) for v in bad_values(spec)]
    return cases


BAD = bad_cases()


def test_every_parameter_is_declared_with_limits() -> None:
    """A parameter without a spec (and so without a check) fails here; each default passes."""
    assert len(BAD) > 150
    for name in policy_names():
        specs = param_specs(name)
        assert list(specs) == list(param_defaults(name)), name
        for key, (member, spec) in specs.items():
            if spec.kind in ("int", "float"):
                assert spec.lo is not None and spec.hi is not None, (name, key)
                assert spec.lo <= param_defaults(name)[key] <= spec.hi, (name, key)
            if spec.kind == "choice":
                assert param_defaults(name)[key] in spec.choices, (name, key)
            assert key in param_defaults(member)


@pytest.mark.parametrize(("policy", "key", "value"), BAD)
def test_simulate_refuses_each_bad_value_naming_the_parameter(
    smol: Path, tmp_path: Path, policy: str, key: str, value: str
) -> None:
    out = tmp_path / "out"
    res = memshare(
        "simulate", str(smol), "--policy", policy, "--set", f"{key}={value}", "-o", str(out)
    )
    assert_one_line_error(res, "--set", f"{policy} {key}=", value[:20])
    assert "e.g. " in res.stderr and not out.exists()


@pytest.mark.parametrize(("policy", "key", "value"), BAD[::7])
def test_scoped_and_composed_settings_get_the_same_check(
    smol: Path, tmp_path: Path, policy: str, key: str, value: str
) -> None:
    """``POLICY.key`` beside another policy, and a composition's member parameter."""
    other = "none" if policy != "none" else "prefix"
    res = memshare(
        "simulate", str(smol), "--policy", other, "--policy", policy,
        "--set", f"{policy}.{key}={value}", "-o", str(tmp_path / "o"),
    )  # fmt: skip
    assert_one_line_error(res, "--set", f"{policy} {key}=")
    for name in COMPOSITIONS:
        if policy in name.split("+") and policy != "kvsharer":
            with pytest.raises(InputError, match=f"{policy} {key}="):
                coerce_params(name, {key: value})
            with pytest.raises(InputError, match=f"{policy} {key}="):
                coerce_params(name, {f"{policy}.{key}": value})


@pytest.mark.parametrize(("policy", "key", "value"), BAD[::3])
def test_generate_refuses_before_the_model_loads(
    tmp_path: Path, policy: str, key: str, value: str
) -> None:
    out = tmp_path / "gen"
    res = memshare(
        "generate", str(GSM8K), "-o", str(out), "--policy", policy, "--set", f"{key}={value}"
    )
    assert_one_line_error(res, f"{policy} {key}=")
    assert not out.exists()


def test_sweep_values_of_a_parameter_get_the_same_check(smol: Path, tmp_path: Path) -> None:
    """Every value is checked before the first point runs; the message names the sweep."""
    for key, values in (("tau", "0.1,1e308"), ("num_perm", "32,100000000"), ("k", "2,0")):
        out = tmp_path / key
        res = memshare("sweep", str(smol), f"{key}={values}", "--policy", "cf-topk", "-o", str(out))
        assert_one_line_error(res, f"{key}={values}", f"cf-topk {key}=", values.split(",")[1])
        assert not out.exists()


def test_memory_sizing_parameter_says_what_it_would_need() -> None:
    with pytest.raises(InputError, match=r"num_perm=100000000 .*would take 96\.5 GiB"):
        coerce_params("cf-topk", {"num_perm": "100000000"})


def test_tau_range_is_the_distance_it_bounds() -> None:
    """tau bounds ||x - c|| / ||x||; its range and what 0 and 2 mean are in the message."""
    with pytest.raises(InputError, match=r"0 <= tau <= 100 .*\|\|x - c\|\| / \|\|x\|\|"):
        coerce_params("cf-topk", {"tau": "1e308"})


ACCEPTED = [
    ("cf-topk", ["tau=0", "k=1", "window=0", "ngram=1", "num_perm=1", "min_layers=1e-6"]),
    ("cf-topk", ["tau=100", "k=2147483647", "window=2147483647", "ngram=4", "num_perm=4096"]),
    ("cf-topk", ["tau=1e-50", "seed=18446744073709551615", "granularity=layer", "share=k"]),
    ("cf-topk", ["tau=2.0", "min_layers=1", "granularity=block", "share=kv", "seed=0"]),
    ("prefix+cf-topk", ["tau=0.5", "prefix+cf-topk.window=1", "publish=all"]),
    ("kvshare", ["window=1", "recompute=0"]),
    ("kvshare", ["window=4", "recompute=1"]),
    ("prefix", ["publish=prompt"]),
]


@pytest.mark.parametrize(("policy", "sets"), ACCEPTED)
def test_edge_values_still_run_with_no_warning(
    smol: Path, tmp_path: Path, policy: str, sets: list[str]
) -> None:
    args = [a for s in sets for a in ("--set", s)]
    res = memshare("simulate", str(smol), "--policy", policy, *args, "-o", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "" or "Warning" not in res.stderr, res.stderr
    assert (tmp_path / "o" / "metrics.json").exists()


def test_explicit_defaults_give_the_same_bytes_as_none_given(smol: Path, tmp_path: Path) -> None:
    """A default given as text is the default: the run's results are byte-identical."""
    sets = [f"{k}={v}" for k, v in param_defaults("cf-topk").items()]
    runs = []
    for i, given in enumerate(([], sets)):
        out = tmp_path / str(i)
        args = [a for s in given for a in ("--set", s)]
        assert (
            memshare("simulate", str(smol), "--policy", "cf-topk", *args, "-o", str(out)).returncode
            == 0
        )
        runs.append(out)
    for name in ("metrics.json", "requests.csv", "timeline.csv"):  # not perf.json: wall time
        a, b = (r / name for r in runs)
        assert a.read_bytes() == b.read_bytes(), name


def test_kvshare_window_must_fit_in_a_block() -> None:
    check_block_size("kvshare", {"window": 16}, 16)
    with pytest.raises(InputError, match=r"kvshare window=17 is longer than a block \(16 tokens"):
        check_block_size("kvshare", {"window": 17}, 16)
    with pytest.raises(InputError, match=r"window=5 .*give 1 <= window <= 4, e\.g\. window=4"):
        check_block_size("kvshare", {"window": 5}, 4)
    check_block_size("kvshare", {}, 4)  # the default (8) was not the user's choice
    check_block_size("cf-topk", {"window": 100}, 4)  # cf-topk's window counts blocks


TYPED_BAD: list[tuple[str, str, Any]] = [
    ("cf-topk", "k", True),
    ("cf-topk", "k", 2.0),
    ("cf-topk", "k", "x"),
    ("cf-topk", "tau", math.nan),
    ("cf-topk", "tau", 10**400),
    ("cf-topk", "tau", None),
    ("cf-topk", "tau", [0.1]),
    ("cf-topk", "granularity", 1),
    ("kvshare", "recompute", -0.5),
    ("prefix", "publish", True),
    ("kvsharer", "layer_map_file", 3),
]


@pytest.mark.parametrize(("policy", "key", "value"), TYPED_BAD)
def test_typed_values_from_files_and_python_get_the_same_check(
    policy: str, key: str, value: Any
) -> None:
    """A TOML or ``config.json`` value (typed) and a policy built in Python."""
    with pytest.raises(InputError, match=re.escape(f"config.json: {policy} {key}=")):
        coerce_params(policy, {key: value}, where="config.json")
    with pytest.raises(InputError, match=f"{policy} {key}="):
        make_policy(policy, **{key: value})


def test_typed_values_keep_their_type() -> None:
    got = coerce_params("cf-topk", {"tau": 1, "k": 3, "min_layers": 0.5, "share": "k"})
    assert got == {"tau": 1.0, "k": 3, "min_layers": 0.5, "share": "k"}
    assert type(got["tau"]) is float and type(got["k"]) is int


def test_a_scope_that_is_not_run_is_refused() -> None:
    with pytest.raises(InputError, match=r"'kvshare\.window' names policy 'kvshare'"):
        coerce_params("prefix+cf-topk", {"kvshare.window": "3"})
    with pytest.raises(InputError, match="policy 'prefix' has no parameter 'tau'"):
        coerce_params("prefix+cf-topk", {"prefix.tau": "0.3"})
    assert coerce_params("prefix+cf-topk", {"cf-topk.tau": "0.3"}) == {"tau": 0.3}


def test_layer_map_file_is_checked_as_a_file(layer_map: Path, tmp_path: Path, smol: Path) -> None:
    res = memshare(
        "simulate", str(smol), "--policy", "kvsharer", "--set", "layer_map_file=",
        "-o", str(tmp_path / "o"),
    )  # fmt: skip
    assert_one_line_error(res, "layer_map_file", "calibrate")
    ok = memshare(
        "simulate", str(smol), "--policy", "kvsharer", "--set", f"layer_map_file={layer_map}",
        "-o", str(tmp_path / "ok"),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr


def test_a_member_scoped_setting_reaches_the_composition_that_holds_it(
    smol: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    res = memshare(
        "simulate", str(smol), "--model-config", "smollm2-135m", "--policy", "prefix+cf-topk",
        "--policy", "prefix", "--set", "cf-topk.tau=0.3", "-o", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    cfg = json.loads((out / "prefix+cf-topk" / "config.json").read_text())["config"]
    assert cfg["policy_params"]["tau"] == 0.3
    plain = json.loads((out / "prefix" / "config.json").read_text())["config"]
    assert "tau" not in plain["policy_params"]  # prefix holds no cf-topk
    res = memshare("simulate", str(smol), "--policy", "prefix", "--set", "cf-topk.tau=0.3",
                   "-o", str(tmp_path / "other"))  # fmt: skip
    assert_one_line_error(res, "'cf-topk.tau' names policy 'cf-topk', which is not run")
