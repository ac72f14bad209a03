"""Per-example test results for the quality benchmark v2: correct flags, not only accuracy.

What and why
------------
The paired bootstrap of ``benchmarks.stats`` resamples test examples, so every evaluated adapter
must leave one correct/incorrect flag per test example, in a fixed order shared by every row and
seed. ``correct_flags`` reads them from ``workload.training.example_logits`` (the logits
``evaluate_lora`` scores), so a flag vector's mean is exactly ``evaluate_lora``'s accuracy.

``TrackingWorkload`` is the v1 ``Workload`` that ``benchmarks.quality.run_federated`` already
drives, with two additions: the ``"curve"`` split (a small fixed subset scored after every
round, for the per-round curves) and a memory of the last adapter it scored (the final global,
which the caller then scores on the full test split with ``test_flags``). It also keeps the
time and example counts it spent evaluating (the budget planner's measured costs).

Flags travel in JSON as strings of ``0`` / ``1`` (``encode_flags`` / ``decode_flags``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from numpy.typing import NDArray

from benchmarks.quality import Adapter, QualityConfig, Scores, Workload, workload_settings
from workload.model import build_lora_model, set_lora_state
from workload.tasks import TaskData, load_task
from workload.training import TrainSettings, example_logits

# The test subsets' selection seed (v1's, so the first 96 of a class-balanced draw agree).
TEST_SEED = 12345


def correct_flags(model: torch.nn.Module, data: TaskData, settings: TrainSettings) -> list[bool]:
    """For each example of ``data`` (in order): does ``model`` put its label first?"""
    logits = example_logits(model, data, settings)
    predicted = logits.argmax(dim=-1).tolist()
    return [int(p) == label for p, label in zip(predicted, data.labels, strict=True)]


def encode_flags(flags: Sequence[bool]) -> str:
    """``[True, False]`` -> ``"10"`` (compact in JSON)."""
    return "".join("1" if f else "0" for f in flags)


def decode_flags(text: str) -> NDArray[np.bool_]:
    """``"10"`` -> ``array([True, False])``; ValueError on another character."""
    if set(text) - {"0", "1"}:
        raise ValueError("flags must be a string of 0 and 1")
    flags: NDArray[np.bool_] = np.frombuffer(text.encode(), dtype=np.uint8) == ord("1")
    return flags


@dataclass
class TrackingWorkload(Workload):
    """A ``Workload`` with a per-round ``"curve"`` split, a memory of the last scored adapter,
    and a meter of its evaluation cost (see the module docstring)."""

    curve: dict[str, TaskData] = field(default_factory=dict)
    last_adapter: Adapter | None = None
    eval_seconds: float = 0.0
    eval_examples: int = 0

    def evaluate(
        self,
        adapter: Mapping[str, torch.Tensor],
        split: str = "test",
        tasks: Sequence[str] | None = None,
    ) -> Scores:
        """Accuracy per task of ``split`` ("test", "dev" or "curve"); remembers ``adapter``.

        ``"skip"`` scores nothing (tuning runs score only their last adapter, on dev).
        """
        self.last_adapter = {k: v.detach().clone() for k, v in adapter.items()}
        if split == "skip":
            return {}
        data = {"test": self.test, "dev": self.dev, "curve": self.curve}[split]
        names = list(tasks) if tasks is not None else list(data)
        flags = self.flags(adapter, {name: data[name] for name in names})
        return {name: float(np.mean(flags[name])) for name in names}

    def flags(
        self, adapter: Mapping[str, torch.Tensor], data: Mapping[str, TaskData]
    ) -> dict[str, list[bool]]:
        """Per-example correct flags of ``adapter`` on each task of ``data`` (metered)."""
        began = time.perf_counter()
        set_lora_state(self.model, adapter)
        out = {name: correct_flags(self.model, task, self.train) for name, task in data.items()}
        self.eval_seconds += time.perf_counter() - began
        self.eval_examples += sum(len(task) for task in data.values())
        return out

    def test_flags(
        self, adapter: Mapping[str, torch.Tensor], tasks: Sequence[str] | None = None
    ) -> dict[str, list[bool]]:
        """Per-example flags on the test split (every task unless ``tasks``)."""
        names = list(tasks) if tasks is not None else list(self.test)
        return self.flags(adapter, {name: self.test[name] for name in names})


def load_tracking_workload(config: QualityConfig, curve_examples: int) -> TrackingWorkload:
    """The model once, the test subsets (``config.eval_examples`` per task, or the whole split
    when smaller), the seen tasks' dev subsets, and the first ``curve_examples`` of a
    class-balanced draw of each test split for the per-round curves."""
    lora, train = workload_settings(config)
    work = TrackingWorkload(config, lora, train, build_lora_model(lora, seed=0))
    for name in (*config.seen, *config.unseen):
        work.test[name] = load_task(name, "test", limit=config.eval_examples, seed=TEST_SEED)
        work.curve[name] = load_task(name, "test", limit=curve_examples, seed=TEST_SEED)
    for name in config.seen:
        work.dev[name] = load_task(name, "dev", limit=config.dev_examples, seed=TEST_SEED)
    return work
