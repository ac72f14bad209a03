"""A real `flwr run` simulation with three LoRA ranks (issue 16): client-ranks '2,4,8' on 3
SuperNodes, svd, 2 short rounds. The run ends with a PEFT-loadable adapter at rank 8, every
site's truncation of it loads at the site's rank, and metrics.json records each site's rank and
truncation error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strategies.adapter_io.config import adapter_config_for
from strategies.adapter_io.reading import read_adapter_dir
from strategies.adapter_io.writing import write_adapter_dir
from strategies.merging.ranks import adapter_at_rank
from tests.integration.simulation import run_simulation
from workload.model import resolve_model_path

RANKS = (2, 4, 8)


@pytest.mark.integration
def test_three_rank_simulation_ends_with_adapters_that_load_at_every_rank(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModel

    out = tmp_path / "run"
    overrides = (
        "merge-method='svd' client-ranks='2,4,8' lora-r=4 lora-alpha=8 num-server-rounds=2 "
        "min-train-nodes=3 train-examples=32 eval-examples=32 max-length=32 "
        f"seen-tasks='banking77,sentiment' unseen-tasks='' output-dir='{out}'"
    )
    returncode, log = run_simulation(tmp_path, overrides, supernodes=3)
    assert returncode == 0, log[-4000:]
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [entry["server-round"] for entry in rounds] == [0, 1, 2]
    for entry in rounds[1:]:
        assert entry["train"]["clients-accepted"] == 3, entry["merge"]["rejected"]
        assert sorted(entry["merge"]["site-ranks"].values()) == list(RANKS)
    errors = rounds[2]["merge"]["site-truncation-errors"]
    by_rank = {rank: errors[node] for node, rank in rounds[2]["merge"]["site-ranks"].items()}
    assert by_rank[8] == 0.0 and by_rank[2] > 0.0

    final = read_adapter_dir(out / "final")
    assert final.config["r"] == 8 and final.config["lora_alpha"] == 16
    base_path = resolve_model_path("")
    loaded = PeftModel.from_pretrained(AutoModel.from_pretrained(base_path), out / "final")
    assert loaded.peft_config["default"].r == 8
    for rank in RANKS:
        folder = write_adapter_dir(
            tmp_path / f"site-{rank}",
            adapter_at_rank(final.tensors, rank).tensors,
            adapter_config_for(base_path, rank, 2 * rank, ["query", "value"]),
        )
        site = PeftModel.from_pretrained(AutoModel.from_pretrained(base_path), folder)
        assert site.peft_config["default"].r == rank
