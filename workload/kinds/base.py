"""The interface every task kind implements, and the one model a process shares between nodes.

What differed between the kinds (once ``if task == "causal-lm"`` branches in five files) is what
a ``TaskKind`` answers: the base model class and PEFT task type of the adapters, the process's
model for the kind, one round of local training and one local evaluation of the global adapter
(the ClientApp's handlers), and the server's checks, plots and scoring of the global adapter.
Settings come from the run config (and node config) exactly as before, so no key changes.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from peft import PeftModel, TaskType
from transformers import PreTrainedTokenizerBase

from workload.config import read_int
from workload.model import LoraSettings, set_lora_state

Evaluate = Callable[[Mapping[str, torch.Tensor]], dict[str, float]]
Metrics = dict[str, int | float]
Result = TypeVar("Result")

# One model per process, shared by the nodes a simulation worker runs and by both kinds; the
# lock keeps a (load global adapter, train or score, read adapter) sequence from interleaving
# with another.
MODEL_LOCK = threading.Lock()
_SHARED: dict[Hashable, LoadedModel] = {}


@dataclass(frozen=True)
class LoadedModel:
    """A base model with LoRA adapters (only they are trainable) and its tokenizer."""

    peft: PeftModel
    tokenizer: PreTrainedTokenizerBase


@dataclass(frozen=True)
class LocalRound:
    """What a node knows about the round it trains or scores in.

    ``run_config`` and ``node_config`` are Flower's mappings (the node config names the node's
    data); ``server_round`` and ``learning_rate`` come from the train instruction (``None``:
    run-config ``learning-rate``).
    """

    run_config: Mapping[str, Any]
    node_config: Mapping[str, Any]
    server_round: int = 0
    learning_rate: float | None = None

    def partition_id(self) -> int | None:
        """Node-config ``partition-id`` (set by the simulation), ``None`` on a real site."""
        if "partition-id" not in self.node_config:
            return None
        return read_int(self.node_config, "partition-id", 0, minimum=0, source="node config")

    def seed(self) -> int:
        """Run-config ``seed`` + partition id + server round: a new draw for every node and
        round, the same on every rerun."""
        base = read_int(self.run_config, "seed", 0, minimum=0)
        return base + (self.partition_id() or 0) + self.server_round


@dataclass(frozen=True)
class LocalTraining:
    """One round of local training: the trained LoRA tensors, the examples they were trained on
    (the update's weight), the mean training loss, and what the client's log line names
    (the data, and for causal-lm the response tokens)."""

    trained: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    summary: str


@dataclass(frozen=True)
class ServerWorkload:
    """The server's run-config view of the workload (``ServerSettings`` fields; the workload
    does not import the server): which tasks are seen and unseen, how many examples the server
    scores, the seed, and whether and on what file it scores the global adapter."""

    seen_tasks: tuple[str, ...]
    unseen_tasks: tuple[str, ...]
    eval_examples: int
    seed: int
    server_eval: bool
    server_eval_data: str = ""


class TaskKind(ABC):
    """One value of run-config ``task``: the model, local training and scoring it stands for.

    Subclasses are registered with ``workload.kinds.registry.register_task_kind(name)``, which
    sets ``name`` and keeps one instance; the apps call ``get_task_kind(name)``.
    """

    name: ClassVar[str]
    # PEFT's task type of the adapters (the server writes it to adapter_config.json when
    # ``records_task_type``; classification adapters have always been written without one).
    peft_task_type: ClassVar[TaskType]
    records_task_type: ClassVar[bool] = False
    # The transformers auto class of the base model (its forward decides the adapter's keys).
    base_model_class: ClassVar[Any]

    def adapter_config_fields(self) -> dict[str, str]:
        """Extra ``adapter_config.json`` fields of this kind's adapters."""
        return {"task_type": self.peft_task_type.value} if self.records_task_type else {}

    @abstractmethod
    def model_key(self, lora: LoraSettings, run_config: Mapping[str, Any]) -> Hashable:
        """Everything that shapes the loaded model: a new key means a new model is loaded."""

    @abstractmethod
    def load_model(self, lora: LoraSettings, run_config: Mapping[str, Any]) -> LoadedModel:
        """The base model with fresh LoRA adapters for local training and scoring."""

    @abstractmethod
    def train_round(
        self, lora: LoraSettings, run: LocalRound, global_state: Mapping[str, torch.Tensor]
    ) -> LocalTraining:
        """Train the global adapter on the node's local data for one round."""

    @abstractmethod
    def evaluate_local(
        self, lora: LoraSettings, run: LocalRound, global_state: Mapping[str, torch.Tensor]
    ) -> Metrics:
        """Score the global adapter on the node's held-out data: the evaluate reply's metrics,
        ``num-examples`` and ``eval-loss`` among them."""

    @abstractmethod
    def check_server_workload(
        self, workload: ServerWorkload, run_config: Mapping[str, Any]
    ) -> None:
        """Refuse (ValueError) at server start a run config this kind cannot run: checked
        before anything is loaded, so a typo fails the run, not every client."""

    def plotted_tasks(self, workload: ServerWorkload) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The seen and unseen tasks whose server scores the run plots; by default none."""
        return (), ()

    @abstractmethod
    def server_evaluator(
        self, lora: LoraSettings, run_config: Mapping[str, Any], workload: ServerWorkload
    ) -> Evaluate | None:
        """The server's scorer of the global adapter, or ``None`` when the run has none."""

    def on_shared_model(
        self,
        lora: LoraSettings,
        run_config: Mapping[str, Any],
        global_state: Mapping[str, torch.Tensor],
        work: Callable[[LoadedModel], Result],
    ) -> Result:
        """``work`` on the process's one model, holding ``MODEL_LOCK``, with ``global_state``
        loaded into its adapters.

        The model is loaded on first use and kept while ``(name, model_key)`` stays the same (the
        adapters are overwritten before every use); another key drops it and loads the new one,
        so a process never holds two base models.
        """
        key = (self.name, self.model_key(lora, run_config))
        with MODEL_LOCK:
            model = _SHARED.get(key)
            if model is None:
                _SHARED.clear()
                model = self.load_model(lora, run_config)
                _SHARED[key] = model
            set_lora_state(model.peft, global_state)
            return work(model)
