"""Reuse of a client's local training when the same round comes again, exactly.

What and why
------------
A client's round is a pure function of where it starts (the global it received), the examples
it trains on, its training settings and its seed: ``workload.training.train_lora`` is
deterministic on the CPU for the same inputs. Every federated run of one seed starts from the
same initial global, so the first round's training is the same for every merge method and
every server step size, and a benchmark that tunes several methods at one seed trains the same
first round again and again (issue 31: at 64 local steps a round of 7 clients costs minutes).

``TrainCache`` keys a training by SHA-256 of the start adapter's tensors (names, dtypes,
shapes, bytes), of the data (texts, labels, label names), of the settings' ``repr`` and of the
seed; a hit returns copies of the trained adapter and the training result. Anything that
changes the outcome changes the key, so a hit is the same training. ``max_entries`` bounds the
memory (first in, first out; an entry of the default workload is about 0.3 MB): later rounds
start from globals that differ by method and step size, so it is round 1 that repeats.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from workload.tasks import TaskData
from workload.training import TrainResult, TrainSettings

Adapter = dict[str, torch.Tensor]


def adapter_digest(adapter: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over ``adapter``'s keys (sorted), dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for key in sorted(adapter):
        tensor = adapter[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def data_digest(data: TaskData) -> str:
    """SHA-256 over a task's name, texts, labels and label names, in order."""
    digest = hashlib.sha256()
    for part in (data.name, *data.texts, *map(str, data.labels), "|", *data.label_names):
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


@dataclass
class TrainCache:
    """Trained adapters (and results) by (start, data, settings, seed); see the module docstring.

    ``hits`` and ``misses`` count lookups, so a benchmark can report what the cache saved.
    """

    max_entries: int = 1024
    entries: dict[str, tuple[Adapter, TrainResult]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    @staticmethod
    def key(
        start: Mapping[str, torch.Tensor], data: TaskData, settings: TrainSettings, seed: int
    ) -> str:
        """The cache key of one client training."""
        parts = (adapter_digest(start), data_digest(data), repr(settings), str(seed))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def get(
        self,
        start: Mapping[str, torch.Tensor],
        data: TaskData,
        settings: TrainSettings,
        seed: int,
    ) -> tuple[Adapter, TrainResult] | None:
        """Copies of the stored training of these inputs, or None."""
        found = self.entries.get(self.key(start, data, settings, seed))
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        adapter, result = found
        return {k: v.clone() for k, v in adapter.items()}, result

    def put(
        self,
        start: Mapping[str, torch.Tensor],
        data: TaskData,
        settings: TrainSettings,
        seed: int,
        trained: Mapping[str, torch.Tensor],
        result: TrainResult,
    ) -> None:
        """Store a copy of ``trained``; the oldest entry goes when ``max_entries`` is reached."""
        if len(self.entries) >= self.max_entries:
            self.entries.pop(next(iter(self.entries)))
        key = self.key(start, data, settings, seed)
        self.entries[key] = ({k: v.detach().clone() for k, v in trained.items()}, result)
