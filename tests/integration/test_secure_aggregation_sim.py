"""A real `flwr run` simulation with ``secure-aggregation = true``: 3 clients, SecAgg+ end to end
(Flower's simulation engine, the project's ServerApp and ClientApp), the default workload shrunk.

Checks that the run finishes through the SecAgg+ workflow, sums all three clients, clips
nothing, and writes checkpoints, metrics.json and a final adapter like the normal path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.simulation import run_simulation


@pytest.mark.integration
def test_secure_aggregation_simulation_merges_the_secure_sum(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = (
        "secure-aggregation=true min-train-nodes=3 num-server-rounds=1 train-examples=32 "
        "eval-examples=16 max-length=32 seen-tasks='banking77,sentiment,mcid' "
        f"unseen-tasks='' output-dir='{out}'"
    )
    returncode, log = run_simulation(tmp_path, overrides, supernodes=3)
    assert returncode == 0, log[-4000:]
    assert "Secure aggregation completed" in log, log[-4000:]
    assert "Final adapter" in log, log[-4000:]

    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [entry["server-round"] for entry in rounds] == [0, 1]
    train = rounds[1]["train"]
    assert train["clients-accepted"] == 3
    assert train["round-skipped"] == 0
    assert train["secagg-clipped-clients"] == 0
    assert train["merged-update-norm"] > 0
    assert 0.0 <= rounds[1]["server-eval"]["seen-accuracy"] <= 1.0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0001"]
    assert (out / "final" / "adapter_model.safetensors").stat().st_size > 0
