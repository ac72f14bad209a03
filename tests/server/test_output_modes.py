"""final/ and the checkpoint folders get the modes of any folder the process makes: 0777 less
the umask (0755 under 022), not tempfile.mkdtemp's 0700 (strategies/adapter_io/atomic.py)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from server.checkpoints import CheckpointStore
from strategies.adapter_io.config import adapter_config_for

KEY = "base_model.model.encoder.layer.0.attention.self.query"


@pytest.fixture(params=[0o022, 0o027, 0o077], ids=["umask-022", "umask-027", "umask-077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    mask = int(request.param)
    previous = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_final_and_checkpoints_follow_the_umask(tmp_path: Path, umask: int) -> None:
    store = CheckpointStore(tmp_path, adapter_config_for("tiny", 4, 8, ["query"]), keep=2)
    tensors = {f"{KEY}.lora_A.weight": torch.ones(4, 8), f"{KEY}.lora_B.weight": torch.ones(8, 4)}
    checkpoint = store.save(1, tensors, {})
    final = store.save_final(tensors, {"rounds": 1})
    for folder in (checkpoint, final):
        assert _mode(folder) == 0o777 & ~umask, f"{folder}: {oct(_mode(folder))}"
        for file in folder.iterdir():
            assert _mode(file) == 0o666 & ~umask, f"{file}: {oct(_mode(file))}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
