"""scripts/run_simulation.sh exits with the run's outcome: `flwr run --stream` itself exits 0
however the run ended, so the wrapper reads the run's final status back (`flwr ls --run-id`) and
turns anything but finished:completed into exit status 1 and one line naming the run, its status
and Flower's status details (here the ServerApp's ConfigError).

The failure is one the pre-check cannot see (server/run_config_check.py checks keys and values
by the schema; the task names are the task kind's, checked when the ServerApp starts), so this is
a real `flwr run` that starts, fails in the ServerApp and is reported. About 40 s.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.simulation import ROOT, WRAPPER, simulation_env


@pytest.mark.integration
def test_a_run_that_fails_in_the_serverapp_exits_1_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    completed = subprocess.run(
        [
            "bash",
            str(WRAPPER),
            "-c",
            f"num-server-rounds=1 seen-tasks='nosuchtask' output-dir='{out}'",
        ],
        cwd=ROOT,
        env=simulation_env(tmp_path / "flwr-home", supernodes=2),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    log = completed.stdout + completed.stderr
    assert re.search(r"Successfully started run \d+", completed.stdout), log[-4000:]
    assert completed.returncode == 1, log[-4000:]
    last = completed.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"run_simulation\.sh: error: run \d+ ended finished:failed: Simulation failed with "
        r"exception: run config 'seen-tasks' names unknown task 'nosuchtask'; known: .*",
        last,
    ), log[-4000:]
    assert not out.exists()
