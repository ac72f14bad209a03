"""docs/development.md, "Add a task kind": a kind registered from this test file alone is listed,
accepted by the run-config checks of ``task``, and trains a round through the ClientApp's train
handler (a tiny kind whose "training" adds a fixed small step, so no model is loaded)."""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from peft import TaskType
from transformers import AutoModel

from client.app import train
from protocol import wire
from server.config import ConfigError, ServerSettings
from workload.kinds import available_task_kinds, get_task_kind, register_task_kind
from workload.kinds.base import (
    Evaluate,
    LoadedModel,
    LocalRound,
    LocalTraining,
    Metrics,
    ServerWorkload,
    TaskKind,
)
from workload.kinds.registry import unregister_task_kind
from workload.model import LoraSettings

NAME = "test-nudge"
STEP = 0.25


class _Nudge(TaskKind):
    """Trains nothing: every LoRA tensor moves by ``STEP``, on 3 "examples"."""

    peft_task_type = TaskType.FEATURE_EXTRACTION
    base_model_class = AutoModel

    def model_key(self, lora: LoraSettings, run_config: Mapping[str, Any]) -> Hashable:
        return None

    def load_model(self, lora: LoraSettings, run_config: Mapping[str, Any]) -> LoadedModel:
        raise AssertionError("the nudge kind loads no model")

    def train_round(
        self, lora: LoraSettings, run: LocalRound, global_state: Mapping[str, torch.Tensor]
    ) -> LocalTraining:
        trained = {key: value + STEP for key, value in global_state.items()}
        return LocalTraining(trained, 3, 0.5, f"nudged round {run.server_round}")

    def evaluate_local(
        self, lora: LoraSettings, run: LocalRound, global_state: Mapping[str, torch.Tensor]
    ) -> Metrics:
        return {wire.NUM_EXAMPLES: 3, wire.EVAL_LOSS: 0.5}

    def check_server_workload(
        self, workload: ServerWorkload, run_config: Mapping[str, Any]
    ) -> None:
        return None

    def server_evaluator(
        self, lora: LoraSettings, run_config: Mapping[str, Any], workload: ServerWorkload
    ) -> Evaluate | None:
        return None


@pytest.fixture
def nudge() -> Iterator[str]:
    register_task_kind(NAME)(_Nudge)
    try:
        yield NAME
    finally:
        unregister_task_kind(NAME)


def test_a_registered_kind_is_listed_and_accepted_by_the_run_config(nudge: str) -> None:
    assert nudge in available_task_kinds() and isinstance(get_task_kind(nudge), _Nudge)
    assert ServerSettings.from_run_config({"task": nudge}).task == nudge
    assert LoraSettings.from_run_config({"task": nudge}).task == nudge
    with pytest.raises(ConfigError, match=f"one of causal-lm, classification, {nudge}"):
        ServerSettings.from_run_config({"task": "seq2seq"})


def test_a_registered_kind_trains_a_round_through_the_client_app(nudge: str) -> None:
    adapter = {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.ones(4, 2)}
    metadata = Metadata(
        run_id=1,
        message_id="instruction-train",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    content = RecordDict(
        {wire.ARRAYS: ArrayRecord(adapter), wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}
    )
    message: Message = Message(content=content, metadata=metadata)  # type: ignore[call-overload]
    run_config: dict[str, bool | float | int | str] = {"task": nudge, "lora-r": 2}
    node = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config=run_config)
    reply = train(message, node)
    sent = reply.content.array_records[wire.ARRAYS].to_torch_state_dict()
    assert list(sent) == list(adapter)
    for key, value in adapter.items():
        torch.testing.assert_close(sent[key], value + STEP)
    metrics = reply.content.metric_records[wire.METRICS]
    assert (metrics[wire.NUM_EXAMPLES], metrics[wire.TRAIN_LOSS]) == (3, 0.5)


def test_the_built_in_kinds_and_unknown_names_cannot_be_unregistered() -> None:
    with pytest.raises(ValueError, match="'classification' is built in"):
        unregister_task_kind("classification")
    with pytest.raises(ValueError, match="'seq2seq' is not registered"):
        unregister_task_kind("seq2seq")
    assert NAME not in available_task_kinds()  # the fixture's teardown removed it
