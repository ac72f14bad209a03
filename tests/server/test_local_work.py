"""The start-up warning on a server step too large for the clients' local work (issue 31)."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from server.local_work import (
    OVERSHOOT,
    local_steps,
    run_config_warning,
    server_lr_warning,
    tuned_server_lr,
)

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_local_steps_hand_checked() -> None:
    assert local_steps(512, 32, 1) == 16
    assert local_steps(512, 32, 4) == 64
    assert local_steps(100, 32, 2) == 8  # ceil(100 / 32) = 4 per epoch


def test_the_tuned_lr_goes_through_the_measured_points() -> None:
    assert tuned_server_lr(2) == pytest.approx(16.0)
    assert tuned_server_lr(64) == pytest.approx(2.0)
    # log-log: 16 (16 / 2)^(log(1/8) / log(32)) = 16 * 8^-0.6
    assert tuned_server_lr(16) == pytest.approx(16 * 8 ** (math.log(1 / 8) / math.log(32)))
    assert tuned_server_lr(1) == 16.0  # not above the fewest steps measured
    assert tuned_server_lr(128) < tuned_server_lr(64) < tuned_server_lr(16)


def test_the_warning_fires_past_the_overshoot_and_names_the_numbers() -> None:
    assert server_lr_warning(OVERSHOOT * 2.0, 64) is None  # at the bound: no warning
    message = server_lr_warning(4.0, 64)
    assert message is not None
    assert "server-lr 4 with 64 local steps" in message and "about 2" in message
    assert server_lr_warning(16.0, 2) is None
    assert server_lr_warning(32.0, 2) is not None


def test_the_app_defaults_do_not_warn_and_four_local_epochs_do() -> None:
    """pyproject.toml's run config as shipped: no warning; with local-epochs 4 (64 steps at the
    default 512 examples of batch 32) the default server lr 4 warns (the issue's trial)."""
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert run_config_warning(config) is None
    assert run_config_warning({**config, "local-epochs": 4}) is not None
    assert run_config_warning({**config, "local-epochs": 4, "server-lr": 2.0}) is None
    assert run_config_warning({k: v for k, v in config.items() if k != "batch-size"}) is None


def test_ties_warns_at_the_server_lr_that_collapsed_it() -> None:
    """The regime map at 64 steps: TIES collapsed at server lr 2 (FedAvg's best there) and was
    best at 0.5, so 2 warns for TIES and not for FedAvg; 0.5 warns for neither."""
    assert server_lr_warning(2.0, 64) is None
    message = server_lr_warning(2.0, 64, "ties")
    assert message is not None and "ties needs 0.25x FedAvg's" in message
    assert "about 0.5" in message
    assert server_lr_warning(0.5, 64, "ties") is None
    assert server_lr_warning(2.0, 64, "robustmerge") is None  # measured like FedAvg there
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    long_ties = {**config, "local-epochs": 4, "server-lr": 2.0, "merge-method": "ties"}
    assert run_config_warning(long_ties) is not None
    assert run_config_warning({**long_ties, "merge-method": "fedavg"}) is None
