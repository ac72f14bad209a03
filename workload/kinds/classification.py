"""The classification kind (run-config ``task = "classification"``, the default).

A sentence encoder (``AutoModel``, PEFT ``FEATURE_EXTRACTION``) with LoRA, trained to move texts
towards their label names (``workload.training``). Local data: a site's own file (node-config
``data-path`` and optionally ``eval-data-path``; without the latter a fixed 10 % of
``data-path`` is held out, ``workload.tasks.split_holdout``), or in simulation the default
workload: task ``seen-tasks[partition-id % len(seen-tasks)]``, a class-balanced subset of
``train-examples`` of its train split redrawn every round (seed ``seed + partition-id +
server-round``), scored on ``eval-examples`` of its dev split (seed ``seed``, the same subset
every round). With run-config ``partitioner`` other than ``"task"`` a simulated node trains on
its shard of the pooled seen tasks instead (``workload.partitioners``). The server scores the
global adapter on the test splits of the seen and unseen tasks.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from peft import TaskType
from transformers import AutoModel

from protocol import wire
from workload.config import read_int, read_names, read_str
from workload.evaluation import TaskEvaluator
from workload.kinds.base import (
    Evaluate,
    LoadedModel,
    LocalRound,
    LocalTraining,
    Metrics,
    ServerWorkload,
    TaskKind,
)
from workload.kinds.registry import register_task_kind
from workload.model import LoraSettings, build_lora_model, get_lora_state
from workload.partitioners import PartitionSettings, site_shard, uniform_draw
from workload.tasks import (
    TASK_NAMES,
    TaskData,
    balanced_subset,
    load_data_file,
    load_task,
    split_holdout,
)
from workload.training import (
    TrainResult,
    TrainSettings,
    evaluate_lora,
    load_tokenizer,
    model_path,
    train_lora,
)


@dataclass(frozen=True)
class WorkloadSettings:
    """Which local data a node uses (run-config ``seed``, ``train-examples``, ``eval-examples``,
    ``seen-tasks``)."""

    seed: int = 0
    train_examples: int = 512
    eval_examples: int = 256
    seen_tasks: tuple[str, ...] = ("banking77", "stackoverflow", "sentiment", "hwu64")

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> WorkloadSettings:
        """Read and validate the keys; absent keys take the defaults above."""
        default = cls()
        return cls(
            seed=read_int(config, "seed", default.seed, minimum=0),
            train_examples=read_int(config, "train-examples", default.train_examples, minimum=1),
            eval_examples=read_int(config, "eval-examples", default.eval_examples, minimum=1),
            seen_tasks=read_names(
                config, "seen-tasks", ",".join(default.seen_tasks), allowed=TASK_NAMES
            ),
        )


def local_data(
    run: LocalRound,
    workload: WorkloadSettings,
    split: Literal["train", "dev"],
    *,
    limit: int,
    seed: int,
) -> TaskData:
    """The node's training or evaluation examples (see the module docstring)."""
    node = run.node_config
    if "data-path" in node:
        data_path = read_str(node, "data-path", "", source="node config")
        eval_path = read_str(node, "eval-data-path", "", source="node config")
        if eval_path:
            data = load_data_file(data_path if split == "train" else eval_path)
        else:
            train_part, dev_part = split_holdout(load_data_file(data_path))
            data = train_part if split == "train" else dev_part
        return balanced_subset(data, limit, seed=seed)
    partition = run.partition_id()
    if partition is None:
        raise ValueError(
            "node-config has neither 'data-path' (a site's own data file) nor 'partition-id' "
            "(a simulated node of the default workload)"
        )
    partitioning = PartitionSettings.from_run_config(run.run_config)
    if partitioning.partitioner != "task":
        return partitioned_data(run, workload, partitioning, partition, split, limit, seed)
    task = workload.seen_tasks[partition % len(workload.seen_tasks)]
    return load_task(task, split, limit=limit, seed=seed)


def partitioned_data(
    run: LocalRound,
    workload: WorkloadSettings,
    partitioning: PartitionSettings,
    partition: int,
    split: Literal["train", "dev"],
    limit: int,
    seed: int,
) -> TaskData:
    """The node's shard of the pooled seen tasks (``workload.partitioners``): a uniform draw of
    its train part, or its held-out 10 % for evaluation."""
    if "num-partitions" not in run.node_config:
        raise ValueError(
            f"run-config partitioner {partitioning.partitioner!r} needs node-config "
            "'num-partitions' (set by the simulation); a real site sets 'data-path'"
        )
    count = read_int(run.node_config, "num-partitions", 1, minimum=1, source="node config")
    shard = site_shard(workload.seen_tasks, partition, count, partitioning)
    train_part, dev_part = split_holdout(shard)
    return uniform_draw(train_part if split == "train" else dev_part, limit, seed=seed)


@register_task_kind("classification")
class Classification(TaskKind):
    """Label-name similarity classification with a LoRA-adapted sentence encoder."""

    peft_task_type = TaskType.FEATURE_EXTRACTION
    base_model_class = AutoModel

    def model_key(self, lora: LoraSettings, run_config: Mapping[str, Any]) -> Hashable:
        """The LoRA settings alone shape the encoder."""
        return lora

    def load_model(self, lora: LoraSettings, run_config: Mapping[str, Any]) -> LoadedModel:
        """The encoder with fresh adapters (seed 0: they are overwritten before every use)."""
        model = build_lora_model(lora, seed=0)
        return LoadedModel(model, load_tokenizer(model_path(model)))

    def train_round(
        self, lora: LoraSettings, run: LocalRound, global_state: Mapping[str, torch.Tensor]
    ) -> LocalTraining:
        """``train_lora`` on the node's train examples for this round."""
        training = TrainSettings.from_run_config(run.run_config)
        if run.learning_rate is not None:
            training = replace(training, learning_rate=run.learning_rate)
        workload = WorkloadSettings.from_run_config(run.run_config)
        seed = run.seed()
        data = local_data(run, workload, "train", limit=workload.train_examples, seed=seed)

        def train(model: LoadedModel) -> tuple[TrainResult, dict[str, torch.Tensor]]:
            return train_lora(model.peft, data, training, seed=seed), get_lora_state(model.peft)

        result, trained = self.on_shared_model(lora, run.run_config, global_state, train)
        return LocalTraining(trained, result.num_examples, result.mean_loss, data.name)

    def evaluate_local(
        self, lora: LoraSettings, run: LocalRound, global_state: Mapping[str, torch.Tensor]
    ) -> Metrics:
        """``num-examples``, ``eval-loss`` and ``eval-accuracy`` on the node's dev examples."""
        training = TrainSettings.from_run_config(run.run_config)
        workload = WorkloadSettings.from_run_config(run.run_config)
        data = local_data(run, workload, "dev", limit=workload.eval_examples, seed=workload.seed)
        result = self.on_shared_model(
            lora,
            run.run_config,
            global_state,
            lambda model: evaluate_lora(model.peft, data, training),
        )
        return {
            wire.NUM_EXAMPLES: result.num_examples,
            wire.EVAL_LOSS: result.loss,
            wire.EVAL_ACCURACY: result.accuracy,
        }

    def check_server_workload(
        self, workload: ServerWorkload, run_config: Mapping[str, Any]
    ) -> None:
        """Valid training and partitioning settings; seen and unseen tasks known and not
        overlapping."""
        TrainSettings.from_run_config(run_config)
        PartitionSettings.from_run_config(run_config)
        for key, names in (
            ("seen-tasks", workload.seen_tasks),
            ("unseen-tasks", workload.unseen_tasks),
        ):
            for name in names:
                if name not in TASK_NAMES:
                    raise ValueError(
                        f"run config {key!r} names unknown task {name!r}; "
                        f"known: {', '.join(TASK_NAMES)}"
                    )
        overlap = sorted(set(workload.seen_tasks) & set(workload.unseen_tasks))
        if overlap:
            raise ValueError(
                f"tasks {overlap} are both seen and unseen: unseen tasks are never trained on"
            )

    def plotted_tasks(self, workload: ServerWorkload) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The seen and unseen tasks the server scores."""
        return workload.seen_tasks, workload.unseen_tasks

    def server_evaluator(
        self, lora: LoraSettings, run_config: Mapping[str, Any], workload: ServerWorkload
    ) -> Evaluate | None:
        """Accuracy on every seen and unseen task's test split, with ``server-eval``."""
        if not workload.server_eval:
            return None
        evaluator = TaskEvaluator(
            lora,
            TrainSettings.from_run_config(run_config),
            workload.seen_tasks,
            workload.unseen_tasks,
            examples=workload.eval_examples,
            seed=workload.seed,
        )
        return evaluator.evaluate
