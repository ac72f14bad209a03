"""Checkpoints: atomic PEFT folders with a checksum; a corrupt latest falls back to the previous."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.checkpoints import CheckpointStore, tensors_checksum
from strategies.adapter_io.config import adapter_config_for
from strategies.adapter_io.layout import ADAPTER_WEIGHTS


def adapter(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": torch.randn(
            4, 8, generator=generator
        ),
        "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight": torch.randn(
            8, 4, generator=generator
        ),
    }


def store(tmp_path: Path, keep: int = 3) -> CheckpointStore:
    return CheckpointStore(tmp_path, adapter_config_for("tiny", 4, 8, ["query"]), keep=keep)


def test_round_trip_and_latest(tmp_path: Path) -> None:
    checkpoints = store(tmp_path)
    for server_round in (1, 2):
        checkpoints.save(server_round, adapter(server_round), {"history": [server_round]})
    latest = checkpoints.latest_valid()
    assert latest is not None
    assert latest.server_round == 2
    assert latest.state["history"] == [2]
    for key, value in adapter(2).items():
        assert torch.equal(latest.tensors[key], value)
    config = json.loads((latest.path / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert config["peft_type"] == "LORA"


def test_old_checkpoints_are_pruned(tmp_path: Path) -> None:
    checkpoints = store(tmp_path, keep=2)
    for server_round in range(1, 5):
        checkpoints.save(server_round, adapter(server_round), {})
    assert checkpoints.rounds() == [3, 4]


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "state-mismatch", "missing-state"])
def test_corrupt_latest_falls_back_to_previous(tmp_path: Path, damage: str) -> None:
    checkpoints = store(tmp_path)
    checkpoints.save(1, adapter(1), {"history": ["one"]})
    checkpoints.save(2, adapter(2), {"history": ["two"]})
    latest_dir = checkpoints.round_path(2)
    weights = latest_dir / ADAPTER_WEIGHTS
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip-byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "state-mismatch":
        state = json.loads((latest_dir / "state.json").read_text())
        state["tensors-sha256"] = "0" * 64
        (latest_dir / "state.json").write_text(json.dumps(state))
    else:
        (latest_dir / "state.json").unlink()
    latest = checkpoints.latest_valid()
    assert latest is not None
    assert latest.server_round == 1
    assert latest.state["history"] == ["one"]


def test_no_checkpoint_gives_none(tmp_path: Path) -> None:
    assert store(tmp_path).latest_valid() is None


def test_checksum_sees_values_dtypes_and_names() -> None:
    base = adapter(0)
    assert tensors_checksum(base) == tensors_checksum({k: v.clone() for k, v in base.items()})
    changed = {k: v.clone() for k, v in base.items()}
    next(iter(changed.values()))[0, 0] += 1e-6
    assert tensors_checksum(changed) != tensors_checksum(base)
    assert tensors_checksum({k: v.double() for k, v in base.items()}) != tensors_checksum(base)
