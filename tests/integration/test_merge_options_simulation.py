"""A merge method's own hyperparameter set in the run config reaches the server's merge in a
real `flwr run` (issue 24): dare's drop rate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.simulation import run_simulation


@pytest.mark.integration
def test_dare_drop_rate_from_the_run_config_reaches_the_merge(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = (
        "num-server-rounds=1 train-examples=16 eval-examples=16 max-length=32 "
        "seen-tasks='banking77,sentiment' unseen-tasks='mcid' "
        f"merge-method='dare' dare-drop-rate=0.3 output-dir='{out}'"
    )
    returncode, log = run_simulation(tmp_path, overrides)
    assert returncode == 0, log[-4000:]
    merge_lines = [line for line in log.splitlines() if "Merge: dare {" in line]
    assert merge_lines and "'drop_rate': 0.3" in merge_lines[0], log[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["run-config"]["dare-drop-rate"] == 0.3
    assert metrics["rounds"][-1]["train"]["clients-accepted"] == 2
