"""A 3-rank federation in one process (issue 16): real ClientApp handlers at ranks 2, 4 and 8
(run-config ``client-ranks``), the round loop, FedRobustMerge with svd. The final adapter is a
PEFT adapter at the largest rank, and each site's truncation of it loads at the site's rank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel

from client.app import train
from server.checkpoints import CheckpointStore
from server.round_modes import MessageRounds
from server.run_loop import LoopSettings, run_federation
from strategies import FedRobustMerge
from strategies.adapter_io.config import adapter_config_for
from strategies.adapter_io.reading import read_adapter_dir
from strategies.adapter_io.writing import write_adapter_dir
from strategies.merging.ranks import adapter_at_rank
from tests.server.test_run_loop import ROUND_TIMEOUT, ThreadGrid
from tests.strategies.test_fed_robustmerge_ranks import MIXED_RANK_SCREEN
from tests.workload.tiny_model import save_tiny_bert, tiny_run_config
from workload.model import LoraSettings, initial_adapter

pytestmark = pytest.mark.usefixtures("flower_task_identity")

RANKS = (2, 4, 8)


@pytest.mark.parametrize(
    ("method", "mode"), [("svd", "paper-exact"), ("robustmerge", "paper-equation")]
)
def test_three_ranks_run_end_to_end_and_every_rank_loads_in_peft(
    tmp_path: Path, method: str, mode: str
) -> None:
    model_dir = save_tiny_bert(tmp_path / "tiny-bert")
    run_config: dict[str, Any] = tiny_run_config(
        model_dir, **{"client-ranks": ",".join(map(str, RANKS)), "lora-r": 4, "lora-alpha": 8}
    )
    lora = LoraSettings.for_global(run_config)
    assert (lora.r, lora.alpha) == (8, 16)  # alpha / r = 2 at every rank
    grid = ThreadGrid({1: train, 2: train, 3: train}, run_config)  # partition-id = node - 1
    strategy = FedRobustMerge(
        robust=MIXED_RANK_SCREEN,
        merge_method=method,
        mode=mode,
        device="cpu",
        min_train_nodes=3,
        fraction_evaluate=0.0,
        server_lr=1.0,
    )
    config = adapter_config_for(str(model_dir), lora.r, lora.alpha, ["query", "value"])
    out = tmp_path / "run"
    try:
        run_federation(
            grid,  # type: ignore[arg-type]
            MessageRounds(strategy),
            LoopSettings(num_rounds=2, round_timeout=ROUND_TIMEOUT, run_dir=out, resume=False),
            initial=initial_adapter(lora, seed=0),
            store=CheckpointStore(out, config),
            summary={},
        )
    finally:
        grid.join_all()

    metrics = json.loads((out / "metrics.json").read_text())
    for entry in metrics["rounds"]:
        assert entry["train"]["clients-accepted"] == 3, entry["merge"]["rejected"]
        assert entry["merge"]["site-ranks"] == {"1": 2, "2": 4, "3": 8}
        errors = entry["merge"]["site-truncation-errors"]
        assert errors["3"] == 0.0
        if entry["server-round"] == 1:
            assert errors["1"] == errors["2"] == 0.0  # round 0: B = 0, nothing to truncate
        else:
            assert errors["1"] > errors["2"] > 0.0
    for node, rank in zip((1, 2, 3), RANKS, strict=True):
        sent = grid.replies[(2, node)].content.array_records["arrays"].to_torch_state_dict()
        assert all(v.shape[0 if ".lora_A." in k else 1] == rank for k, v in sent.items()), node

    final = read_adapter_dir(out / "final")
    assert final.config["r"] == 8
    base = AutoModel.from_pretrained(str(model_dir))
    loaded = PeftModel.from_pretrained(base, out / "final")
    assert loaded.peft_config["default"].r == 8
    for rank in RANKS:
        site = LoraSettings.for_global(run_config).with_rank(rank)
        folder = write_adapter_dir(
            tmp_path / f"site-{rank}",
            adapter_at_rank(final.tensors, rank).tensors,
            adapter_config_for(str(model_dir), site.r, site.alpha, ["query", "value"]),
        )
        model = PeftModel.from_pretrained(AutoModel.from_pretrained(str(model_dir)), folder)
        assert model.peft_config["default"].r == rank
        assert model.peft_config["default"].lora_alpha / rank == 2.0
        factors_a = [v for k, v in model.state_dict().items() if "lora_A" in k]
        assert len(factors_a) == sum(".lora_A." in key for key in final.tensors)
        assert {int(v.shape[0]) for v in factors_a} == {rank}
    assert torch.isfinite(torch.cat([v.flatten() for v in final.tensors.values()])).all()


def _mixed_rank_run(
    model_dir: Path, out: Path, run_config: dict[str, Any], rounds: int, resume: bool
) -> FedRobustMerge:
    lora = LoraSettings.for_global(run_config)
    grid = ThreadGrid({1: train, 2: train, 3: train}, run_config)
    strategy = FedRobustMerge(
        robust=MIXED_RANK_SCREEN,
        merge_method="svd",
        device="cpu",
        min_train_nodes=3,
        fraction_evaluate=0.0,
        server_lr=1.0,
    )
    config = adapter_config_for(str(model_dir), lora.r, lora.alpha, ["query", "value"])
    try:
        run_federation(
            grid,  # type: ignore[arg-type]
            MessageRounds(strategy),
            LoopSettings(
                num_rounds=rounds, round_timeout=ROUND_TIMEOUT, run_dir=out, resume=resume
            ),
            initial=initial_adapter(lora, seed=0),
            store=CheckpointStore(out, config),
            summary={},
        )
    finally:
        grid.join_all()
    return strategy


def test_a_resumed_mixed_rank_run_ends_bit_identical_to_an_uninterrupted_one(
    tmp_path: Path,
) -> None:
    """Stopped after round 2 and resumed for round 3, a 3-rank run ends where a 3-round run does;
    the resumed strategy knows each node's rank from the checkpoint (a later reply of another
    rank would be refused)."""
    model_dir = save_tiny_bert(tmp_path / "tiny-bert")
    run_config: dict[str, Any] = tiny_run_config(
        model_dir, **{"client-ranks": ",".join(map(str, RANKS)), "lora-r": 4, "lora-alpha": 8}
    )
    straight = tmp_path / "straight"
    _mixed_rank_run(model_dir, straight, run_config, 3, resume=False)
    interrupted = tmp_path / "interrupted"
    _mixed_rank_run(model_dir, interrupted, run_config, 2, resume=False)
    resumed = _mixed_rank_run(model_dir, interrupted, run_config, 3, resume=True)
    assert resumed.admission.node_ranks == {1: 2, 2: 4, 3: 8}
    want = read_adapter_dir(straight / "final").tensors
    got = read_adapter_dir(interrupted / "final").tensors
    assert set(got) == set(want)
    assert all(torch.equal(got[key], want[key]) for key in want)
    rounds = json.loads((interrupted / "metrics.json").read_text())["rounds"]
    assert [entry["server-round"] for entry in rounds] == [1, 2, 3]
    assert rounds[-1]["merge"]["site-ranks"] == {"1": 2, "2": 4, "3": 8}
