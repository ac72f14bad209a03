"""Server-side evaluation of the global adapter on held-out data of seen and unseen tasks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from client.model import LoraSettings, build_lora_model, set_lora_state
from client.tasks import TaskData, load_task
from client.training import TrainSettings, evaluate_lora


class TaskEvaluator:
    """Scores an adapter on each task's test split (fixed, class-balanced subsets).

    Loads the base model once; only the LoRA tensors change between calls. Unseen tasks are
    never trained on: their scores measure generalisation from label names alone.
    """

    def __init__(
        self,
        lora: LoraSettings,
        training: TrainSettings,
        seen: Sequence[str],
        unseen: Sequence[str],
        *,
        examples: int,
        seed: int,
    ) -> None:
        self.training = training
        self.seen = tuple(seen)
        self.unseen = tuple(unseen)
        self.model = build_lora_model(lora, seed=seed)
        self.data: dict[str, TaskData] = {
            task: load_task(task, "test", limit=examples, seed=seed)
            for task in (*self.seen, *self.unseen)
        }

    def evaluate(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Accuracy and loss per task, and the seen / unseen averages of accuracy."""
        set_lora_state(self.model, tensors)
        metrics: dict[str, float] = {}
        for task, data in self.data.items():
            result = evaluate_lora(self.model, data, self.training)
            metrics[f"{task}-accuracy"] = result.accuracy
            metrics[f"{task}-loss"] = result.loss
        for group, tasks in (("seen", self.seen), ("unseen", self.unseen)):
            if tasks:
                metrics[f"{group}-accuracy"] = sum(metrics[f"{t}-accuracy"] for t in tasks) / len(
                    tasks
                )
        return metrics
