"""Legacy adapter_model.bin: read only with torch.load(weights_only=True) (legacy_reading)."""

from __future__ import annotations

import pytest
import torch

from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_WEIGHTS, LEGACY_WEIGHTS
from strategies.adapter_io.reading import read_adapter_dir
from tests.strategies.conftest import SyntheticFactory, synthetic_tensors


class NotATensor:
    """A picklable object that the weights-only unpickler must refuse."""

    def __init__(self) -> None:
        self.payload = "anything"


def test_bin_is_read_with_weights_only(synthetic_adapter: SyntheticFactory) -> None:
    folder = synthetic_adapter("legacy")
    tensors = synthetic_tensors(3)
    (folder / ADAPTER_WEIGHTS).unlink()
    torch.save(tensors, folder / LEGACY_WEIGHTS)
    loaded = read_adapter_dir(folder)
    assert loaded.weights_file == folder / LEGACY_WEIGHTS
    for key, tensor in tensors.items():
        assert torch.equal(loaded.tensors[key], tensor)


def test_safetensors_wins_over_bin(synthetic_adapter: SyntheticFactory) -> None:
    folder = synthetic_adapter("both", seed=5)
    (folder / LEGACY_WEIGHTS).write_bytes(b"not even a pickle")
    loaded = read_adapter_dir(folder)
    assert loaded.weights_file == folder / ADAPTER_WEIGHTS


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"w": torch.ones(2), "evil": NotATensor()}, "weights_only=True"),
        ({"w": torch.ones(2), "count": 3}, "holds int, not a tensor"),
        ([torch.ones(2)], "must hold a dict of tensors"),
        ({1: torch.ones(2)}, "is not a string"),
    ],
)
def test_bin_with_non_tensors_is_refused(
    synthetic_adapter: SyntheticFactory, content: object, match: str
) -> None:
    folder = synthetic_adapter("legacy")
    (folder / ADAPTER_WEIGHTS).unlink()
    torch.save(content, folder / LEGACY_WEIGHTS)
    with pytest.raises(AdapterFileError, match=match) as caught:
        read_adapter_dir(folder)
    assert caught.value.file == LEGACY_WEIGHTS
    assert "weights_only=False" not in str(caught.value)


def test_garbage_bin_is_refused(synthetic_adapter: SyntheticFactory) -> None:
    folder = synthetic_adapter("legacy")
    (folder / ADAPTER_WEIGHTS).unlink()
    (folder / LEGACY_WEIGHTS).write_bytes(b"\x80\x04garbage")
    with pytest.raises(AdapterFileError, match=LEGACY_WEIGHTS):
        read_adapter_dir(folder)
