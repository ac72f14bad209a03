"""The wrapper's pre-check of -c overrides (server/run_config_check.py): unknown keys are named
with the closest known one, bad values get the ServerApp's own one-line message, all before
Flower starts; and through scripts/run_simulation.sh, exit status 2 and nothing else started."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from server.config import ConfigError, ServerSettings
from server.run_config_check import (
    check_overrides,
    main,
    run_config_arguments,
    unknown_key_refusal,
)
from workload.config import SCHEMA

ROOT = Path(__file__).resolve().parents[2]
WRAPPER = ROOT / "scripts" / "run_simulation.sh"


@pytest.mark.parametrize(
    ("key", "suggested"),
    [
        ("server_lr", "server-lr"),
        ("server-lrr", "server-lr"),
        ("keep_ratio", "keep-ratio"),
        ("num-rounds", "num-server-rounds"),
        ("weight-by-example", "weight-by-examples"),
    ],
)
def test_an_unknown_key_is_named_with_the_closest_known_one(key: str, suggested: str) -> None:
    assert unknown_key_refusal([key], SCHEMA) == (
        f"run config key {key!r} is not a setting of this app; did you mean {suggested!r}?"
    )


def test_a_key_like_nothing_known_points_to_the_docs() -> None:
    refusal = unknown_key_refusal(["seed", "zzz"], SCHEMA)
    assert (
        refusal
        == "run config key 'zzz' is not a setting of this app; see docs/run-config.md for the keys"
    )
    assert unknown_key_refusal(["seed", "server-lr"], SCHEMA) is None


def test_a_bad_value_gets_the_serverapps_own_message() -> None:
    with pytest.raises(ConfigError) as server:
        ServerSettings.from_run_config({"keep-ratio": 1.5})
    with pytest.raises(ConfigError) as checked:
        check_overrides({"keep-ratio": 1.5})
    assert str(checked.value) == str(server.value)
    assert str(checked.value) == (
        "run config key 'keep-ratio' must be a finite number in (0, 1]; got 1.5 (float)"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"learning-rate": -1.0},
            "run config key 'learning-rate' must be a finite number in (0, inf)",
        ),
        ({"lora-r": 0}, "run config key 'lora-r' must be an integer in [1, 1024]; got 0 (int)"),
        ({"seed": 3.0}, "run config key 'seed' must be an integer >= 0; got 3.0 (float)"),
        ({"merge-method": "magic"}, "run config key 'merge-method' must be one of "),
        ({"resume": "yes"}, "run config key 'resume' must be true or false; got 'yes' (str)"),
        (
            {"dp": "server-clipping", "uplink": "sparse"},
            "run config 'dp' = 'server-clipping' needs",
        ),
    ],
)
def test_client_keys_server_keys_and_combinations_are_checked(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        check_overrides(overrides)
    assert str(caught.value).startswith(message), caught.value


def test_good_overrides_pass() -> None:
    check_overrides({})
    check_overrides({"num-server-rounds": 2, "merge-method": "fedavg", "server-lr": 2})


@pytest.mark.parametrize(
    ("argv", "values"),
    [
        (["-c", "a=1", "--stream"], ["a=1"]),
        (["--run-config", "a=1 b=2", "-c", "c=3"], ["a=1 b=2", "c=3"]),
        (["--run-config=a=1"], ["a=1"]),
        (["-ca=1"], ["a=1"]),
        (["--federation-config", "num-supernodes=2"], []),
        (["-c"], []),
    ],
)
def test_run_config_values_are_found_in_flwr_run_arguments(
    argv: list[str], values: list[str]
) -> None:
    assert run_config_arguments(argv) == values


def test_main_prints_one_line_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", "num-server-rounds=1 server_lr=2"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "run_simulation.sh: error: run config key 'server_lr' is not a setting of this app; "
        "did you mean 'server-lr'?\n"
    )
    assert main(["-c", "output-dir=unquoted/path"]) == 2  # Flower's own parser refuses it
    assert "invalid format" in capsys.readouterr().err
    assert main(["-c", "num-server-rounds=2", "--stream"]) == 0


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            "num-server-rounds=1 server_lr=2",
            "run_simulation.sh: error: run config key 'server_lr' is not a setting of this app; "
            "did you mean 'server-lr'?",
        ),
        (
            "num-server-rounds=1 keep-ratio=1.5",
            "run_simulation.sh: error: run config key 'keep-ratio' must be a finite number in "
            "(0, 1]; got 1.5 (float)",
        ),
    ],
    ids=["unknown key", "bad value"],
)
def test_the_wrapper_refuses_before_flower_starts(
    overrides: str, expected: str, tmp_path: Path
) -> None:
    home = tmp_path / "flwr-home"
    completed = subprocess.run(
        ["bash", str(WRAPPER), "-c", overrides],
        cwd=ROOT,
        env={**os.environ, "FLWR_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert completed.stderr.strip().splitlines() == [expected]
    assert completed.stdout == ""
    assert not home.exists()  # refused before the wrapper set up Flower
