"""Fixtures for the workload tests (the client tests reuse them)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.workload.tiny_model import save_tiny_bert

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny BERT and its tokenizer, made once per test session."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run the tiny models on one thread: as fast as two for them, and immune to the spinning
    wait of a second thread when the machine's cores are busy with other jobs (which once made
    these tests 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
