"""The task-kind registry, and the one model a process shares between nodes and kinds."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import pytest
import torch
from peft import TaskType
from transformers import AutoModel, AutoModelForCausalLM

from workload.kinds import available_task_kinds, base, get_task_kind, register_task_kind
from workload.kinds.base import (
    Evaluate,
    LoadedModel,
    LocalRound,
    LocalTraining,
    Metrics,
    ServerWorkload,
    TaskKind,
)
from workload.model import LoraSettings, peft_task_type

WORKLOAD = ServerWorkload(
    seen_tasks=("banking77",),
    unseen_tasks=("mcid",),
    eval_examples=8,
    seed=0,
    server_eval=False,
)


def test_builtin_kinds_are_registered_with_their_model_class_and_task_type() -> None:
    assert available_task_kinds() == ("causal-lm", "classification")
    classification, causal = get_task_kind("classification"), get_task_kind("causal-lm")
    assert (classification.name, causal.name) == ("classification", "causal-lm")
    assert classification.base_model_class is AutoModel
    assert causal.base_model_class is AutoModelForCausalLM
    assert peft_task_type(LoraSettings()) is TaskType.FEATURE_EXTRACTION
    assert peft_task_type(LoraSettings(task="causal-lm")) is TaskType.CAUSAL_LM
    # classification adapters have always been written without a task_type
    assert classification.adapter_config_fields() == {}
    assert causal.adapter_config_fields() == {"task_type": "CAUSAL_LM"}


def test_unknown_and_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown task kind 'seq2seq'; known kinds: causal-lm"):
        get_task_kind("seq2seq")
    with pytest.raises(ValueError, match="'classification' is already registered"):
        register_task_kind("classification")(type(get_task_kind("causal-lm")))


def test_server_checks_plots_and_scorers_follow_the_kind() -> None:
    classification, causal = get_task_kind("classification"), get_task_kind("causal-lm")
    assert classification.plotted_tasks(WORKLOAD) == (("banking77",), ("mcid",))
    assert causal.plotted_tasks(WORKLOAD) == ((), ())
    classification.check_server_workload(WORKLOAD, {})
    overlap = ServerWorkload(("mcid",), ("mcid",), 8, 0, False)
    with pytest.raises(ValueError, match="both seen and unseen"):
        classification.check_server_workload(overlap, {})
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        classification.check_server_workload(ServerWorkload(("nope",), (), 8, 0, False), {})
    causal.check_server_workload(WORKLOAD, {})  # no tasks of its own to check
    assert classification.server_evaluator(LoraSettings(), {}, WORKLOAD) is None
    assert causal.server_evaluator(LoraSettings(task="causal-lm"), {}, WORKLOAD) is None


def test_round_seed_is_run_seed_plus_partition_plus_round() -> None:
    run = LocalRound({"seed": 5}, {"partition-id": 2}, server_round=3)
    assert (run.partition_id(), run.seed()) == (2, 10)
    assert LocalRound({}, {}).partition_id() is None


class _Counting(TaskKind):
    """A kind whose "model" is a marker: counts loads to check the shared cache."""

    loads = 0

    def model_key(self, lora: LoraSettings, run_config: Mapping[str, Any]) -> Hashable:
        return run_config.get("key", 0)

    def load_model(self, lora: LoraSettings, run_config: Mapping[str, Any]) -> LoadedModel:
        type(self).loads += 1
        return LoadedModel(peft=run_config.get("key", 0), tokenizer=None)  # type: ignore[arg-type]

    def train_round(
        self, lora: LoraSettings, run: LocalRound, global_state: Mapping[str, torch.Tensor]
    ) -> LocalTraining:
        raise NotImplementedError

    def evaluate_local(
        self, lora: LoraSettings, run: LocalRound, global_state: Mapping[str, torch.Tensor]
    ) -> Metrics:
        raise NotImplementedError

    def check_server_workload(
        self, workload: ServerWorkload, run_config: Mapping[str, Any]
    ) -> None:
        return None

    def server_evaluator(
        self, lora: LoraSettings, run_config: Mapping[str, Any], workload: ServerWorkload
    ) -> Evaluate | None:
        return None


def test_one_shared_model_per_process_reloaded_only_when_its_key_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(base, "_SHARED", {})
    monkeypatch.setattr(base, "set_lora_state", lambda model, state: None)
    kind = _Counting()
    _Counting.name = "counting"
    seen = [
        kind.on_shared_model(LoraSettings(), {"key": k}, {}, lambda m: m.peft) for k in (1, 1, 2)
    ]
    assert seen == [1, 1, 2]
    assert _Counting.loads == 2
    assert list(base._SHARED) == [("counting", 2)]  # the old model was dropped, not kept
