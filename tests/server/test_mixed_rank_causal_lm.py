"""Causal-LM sites at two LoRA ranks (issue 16), in one process: the real ClientApp train handler
on a tiny LLaMA with run-config ``task = "causal-lm"`` and ``client-ranks = "2,4"``, the round
loop, FedRobustMerge with svd. Each site trains and replies at its own rank (its metric and its
tensors' shapes on all seven projections), the server records both ranks and the truncation
errors, and the merged global stays at the largest rank, as a PEFT causal-LM adapter that loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from client.app import train
from protocol.wire import ARRAYS, LORA_RANK, METRICS
from server.checkpoints import CheckpointStore
from server.round_modes import MessageRounds
from server.run_loop import LoopSettings, run_federation
from strategies import FedRobustMerge
from strategies.adapter_io.config import adapter_config_for
from strategies.adapter_io.reading import read_adapter_dir
from tests.server.test_run_loop import ThreadGrid
from tests.strategies.test_fed_robustmerge_ranks import MIXED_RANK_SCREEN
from tests.workload.tiny_llama import save_tiny_llama, write_echo_jsonl
from workload.model import LoraSettings, initial_adapter, resolve_target_modules

pytestmark = pytest.mark.usefixtures("flower_task_identity", "one_torch_thread")

RANKS = (2, 4)
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Each causal-LM round reloads the tiny model per rank (one shared model per process); generous
# for a busy 2-core machine, where a round takes a few seconds.
ROUND_TIMEOUT = 120.0


@pytest.fixture
def one_torch_thread() -> Any:
    """The tiny model on one thread (as the workload tests do): faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_causal_lm_sites_at_two_ranks_complete_a_round(tmp_path: Path) -> None:
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    data = tmp_path / "data"
    data.mkdir()
    for site in range(len(RANKS)):
        write_echo_jsonl(data / f"site-{site}.jsonl", 16, seed=site)
    run_config: dict[str, Any] = {
        "task": "causal-lm",
        "model": str(model_dir),
        "target-modules": "auto",
        "lora-r": 2,
        "lora-alpha": 4,
        "client-ranks": ",".join(map(str, RANKS)),
        "batch-size": 8,
        "max-length": 64,
        "learning-rate": 0.03,
        "local-epochs": 1,
        "seed": 0,
        "data-path": str(data / "site-{partition-id}.jsonl"),
    }
    lora = LoraSettings.for_global(run_config)
    assert (lora.r, lora.alpha, lora.task) == (4, 8, "causal-lm")  # alpha / r = 2 at every rank
    initial = initial_adapter(lora, seed=0)
    grid = ThreadGrid({1: train, 2: train}, run_config)  # partition-id = node - 1
    strategy = FedRobustMerge(
        robust=MIXED_RANK_SCREEN,
        merge_method="svd",
        device="cpu",
        min_train_nodes=2,
        fraction_evaluate=0.0,
        server_lr=1.0,
    )
    targets = resolve_target_modules(lora)
    assert sorted(targets) == sorted(LLAMA_TARGETS)
    config = adapter_config_for(str(model_dir), lora.r, lora.alpha, targets, task_type="CAUSAL_LM")
    out = tmp_path / "run"
    try:
        run_federation(
            grid,  # type: ignore[arg-type]
            MessageRounds(strategy),
            LoopSettings(num_rounds=2, round_timeout=ROUND_TIMEOUT, run_dir=out, resume=False),
            initial=initial,
            store=CheckpointStore(out, config),
            summary={},
        )
    finally:
        grid.join_all()

    # Each site replied at its own rank, with tensors of that rank on every projection.
    for server_round in (1, 2):
        for node, rank in zip((1, 2), RANKS, strict=True):
            reply = grid.replies[(server_round, node)]
            assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
            assert reply.content.metric_records[METRICS][LORA_RANK] == rank
            arrays = reply.content.array_records[ARRAYS].to_torch_state_dict()
            assert list(arrays) == list(initial)
            for key, tensor in arrays.items():
                global_shape = tuple(initial[key].shape)  # A: 4 x d_in, B: d_out x 4
                want = (rank, global_shape[1]) if ".lora_A." in key else (global_shape[0], rank)
                assert tuple(tensor.shape) == want, (server_round, node, key)
            assert {key.split(".")[-3] for key in arrays} == set(LLAMA_TARGETS)

    metrics = json.loads((out / "metrics.json").read_text())
    rounds = [entry for entry in metrics["rounds"] if entry["server-round"] > 0]
    assert [entry["server-round"] for entry in rounds] == [1, 2]
    for entry in rounds:
        assert entry["train"]["clients-accepted"] == 2, entry["merge"]["rejected"]
        assert entry["merge"]["site-ranks"] == {"1": 2, "2": 4}
        errors = entry["merge"]["site-truncation-errors"]
        assert errors["2"] == 0.0  # the global's own rank
        if entry["server-round"] == 1:
            assert errors["1"] == 0.0  # round 0: B = 0, nothing to truncate
        else:
            assert 0.0 < errors["1"] < 1.0

    # The merged global stays at the largest rank (4), moved from the initial adapter.
    final = read_adapter_dir(out / "final")
    assert final.config["r"] == 4 and final.config["task_type"] == "CAUSAL_LM"
    assert set(final.tensors) == set(initial)
    for key, tensor in final.tensors.items():
        assert tuple(tensor.shape) == tuple(initial[key].shape), key
    assert any(not torch.equal(final.tensors[k], initial[k]) for k in initial if ".lora_B." in k)
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), out / "final"
    )
    loaded_config = loaded.peft_config["default"]
    assert isinstance(loaded_config, LoraConfig) and loaded_config.r == 4
