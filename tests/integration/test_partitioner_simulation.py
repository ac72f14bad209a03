"""A real `flwr run` simulation of 16 sites with Dirichlet(0.1) label skew over the pooled seen
tasks, from the run config alone (issue 26): every site trains on its own shard, the round
merges all 16, and the final adapter folder carries a model card that ModelCard.load reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.integration.simulation import run_simulation

SITES = 16


@pytest.mark.integration
def test_sixteen_sites_with_dirichlet_skew_from_the_run_config(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    overrides = (
        "partitioner='dirichlet' partition-alpha=0.1 "
        f"num-server-rounds=1 min-train-nodes={SITES} train-examples=8 eval-examples=8 "
        "max-length=16 batch-size=8 server-eval=false "
        f"seen-tasks='mcid,hwu64' unseen-tasks='' output-dir='{out}'"
    )
    returncode, log = run_simulation(tmp_path, overrides, supernodes=SITES, timeout=600)
    assert returncode == 0, log[-4000:]
    (entry,) = json.loads((out / "metrics.json").read_text())["rounds"]
    assert entry["train"]["clients-accepted"] == SITES, entry["merge"]["rejected"]
    assert entry["train"]["num-examples"] == 8 * SITES
    # each site names its shard in its log line (Ray folds repeated lines, so not all 16 show)
    assert re.search(r"dirichlet shard \d+/16 of mcid\+hwu64", log), log[-4000:]
    card = ModelCard.load(out / "final" / "README.md")
    assert card.data.library_name == "peft"
    assert "| `partitioner` | dirichlet |" in card.text
    assert f"| 1 | {SITES} | {SITES} | 0 | 0 | {8 * SITES} |" in card.text
