"""Server-side evaluation of the global adapter: on held-out data of seen and unseen tasks
(classification), or loss and perplexity on a server-side JSONL file (causal-lm)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from workload.causal_lm import (
    CausalLmSettings,
    build_causal_lm,
    evaluate_causal_lm,
    load_examples,
)
from workload.model import LoraSettings, build_lora_model, set_lora_state
from workload.tasks import TaskData, load_task
from workload.training import TrainSettings, evaluate_lora


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


class CausalLmEvaluator:
    """Response-token loss and perplexity of an adapter on a server-side instruction file.

    The file has the clients' JSONL schema (``workload.causal_lm``); the first ``eval_examples``
    examples are scored every round. Loads the base model once (this is the one place the
    server reads base weights, and only when ``server-eval-data`` is set).
    """

    def __init__(self, lora: LoraSettings, settings: CausalLmSettings, path: str) -> None:
        self.settings = settings
        self.examples = load_examples(path)
        self.model, self.tokenizer = build_causal_lm(lora, settings)

    def evaluate(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """``eval-loss`` (nats per response token), ``eval-perplexity``, ``num-examples``."""
        set_lora_state(self.model, tensors)
        result = evaluate_causal_lm(self.model, self.tokenizer, self.examples, self.settings)
        return {
            "eval-loss": result.loss,
            "eval-perplexity": result.perplexity,
            "num-examples": float(result.num_examples),
        }
