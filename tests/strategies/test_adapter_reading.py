"""Reading whole PEFT adapter folders (adapter_io.reading)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from strategies.adapter_io.compat import check_compatible
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from strategies.adapter_io.reading import read_adapter_dir
from tests.strategies.conftest import PeftFolders, SyntheticFactory, write_synthetic_adapter


def test_reads_a_folder_saved_by_peft(peft_folders: PeftFolders) -> None:
    folder = read_adapter_dir(peft_folders.adapters[0])
    assert folder.config["peft_type"] == "LORA"
    assert folder.config["r"] == 4
    assert sorted(folder.config["target_modules"]) == ["query", "value"]
    assert folder.weights_file == peft_folders.adapters[0] / ADAPTER_WEIGHTS
    assert len(folder.tensors) == 8  # 2 layers x (query, value) x (A, B)
    a_key = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    assert folder.tensors[a_key].shape == (4, 32)
    assert all(t.abs().sum() > 0 for t in folder.tensors.values())  # B was randomised too


def test_missing_folder_and_files(tmp_path: Path, synthetic_adapter: SyntheticFactory) -> None:
    with pytest.raises(AdapterFileError, match="no such folder"):
        read_adapter_dir(tmp_path / "nope")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(AdapterFileError, match="not a folder"):
        read_adapter_dir(tmp_path / "plain")
    no_config = synthetic_adapter("no-config")
    (no_config / ADAPTER_CONFIG).unlink()
    with pytest.raises(AdapterFileError, match=f"{ADAPTER_CONFIG}: missing"):
        read_adapter_dir(no_config)
    no_weights = synthetic_adapter("no-weights")
    (no_weights / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterFileError, match=f"{ADAPTER_WEIGHTS}: missing") as caught:
        read_adapter_dir(no_weights)
    assert caught.value.folder == no_weights


def test_reading_a_synthetic_folder_twice_is_stable(tmp_path: Path) -> None:
    folder = write_synthetic_adapter(tmp_path / "x", seed=9)
    first, second = read_adapter_dir(folder), read_adapter_dir(folder)
    check_compatible([first, second])
    for key, tensor in first.tensors.items():
        assert torch.equal(second.tensors[key], tensor)
