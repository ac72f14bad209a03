"""The ClientApp handlers, called directly with hand-built Messages: only LoRA tensors and
metrics leave the client, in the wire format the server relies on."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)

from client.app import app, evaluate, train
from protocol.wire import (
    ARRAYS,
    CONFIG,
    EVAL_ACCURACY,
    EVAL_LOSS,
    LORA_RANK,
    METRICS,
    NUM_EXAMPLES,
    SERVER_ROUND,
    TRAIN_LOSS,
)
from tests.workload.tiny_model import tiny_run_config
from workload.model import LoraSettings, initial_adapter
from workload.tasks import load_task


@pytest.fixture(scope="module")
def run_config(tiny_model_dir: Path) -> dict[str, Any]:
    return tiny_run_config(tiny_model_dir, **{"eval-examples": 12})


@pytest.fixture(scope="module")
def global_adapter(run_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    return initial_adapter(LoraSettings.from_run_config(run_config), seed=0)


def context(run_config: dict[str, Any], **node_config: Any) -> Context:
    return Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def instruction(
    adapter: dict[str, torch.Tensor], message_type: str, config: dict[str, Any]
) -> Message:
    """An instruction as the SuperLink delivers it (with the ids it sets)."""
    content = RecordDict({ARRAYS: ArrayRecord(adapter), CONFIG: ConfigRecord(config)})
    metadata = Metadata(
        run_id=1,
        message_id=f"instruction-{message_type}",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    # `metadata=` is Flower's internal constructor path (not in the public overloads).
    message: Message = Message(content=content, metadata=metadata)  # type: ignore[call-overload]
    return message


def test_train_reply_holds_only_lora_tensors_and_metrics(
    run_config: dict[str, Any], global_adapter: dict[str, torch.Tensor]
) -> None:
    msg = instruction(global_adapter, "train", {SERVER_ROUND: 1})
    reply = train(msg, context(run_config, **{"partition-id": 1, "num-partitions": 2}))

    assert not reply.has_error()
    content = reply.content
    assert set(content.keys()) == {ARRAYS, METRICS}
    assert not content.config_records  # No place for texts, labels or paths.
    arrays = content.array_records[ARRAYS]
    assert list(arrays.keys()) == list(global_adapter)  # Same keys, same order.
    received = arrays.to_torch_state_dict()
    for key, tensor in received.items():
        assert ".lora_A." in key or ".lora_B." in key, key
        assert tensor.dtype == torch.float32, key
        assert tensor.shape == global_adapter[key].shape, key
    assert any(not torch.equal(received[k], global_adapter[k]) for k in received)  # It trained.

    metrics = content.metric_records[METRICS]
    assert set(metrics.keys()) == {NUM_EXAMPLES, TRAIN_LOSS, LORA_RANK}
    assert metrics[NUM_EXAMPLES] == 16
    assert metrics[LORA_RANK] == 4  # run-config lora-r: no client-ranks, no node-config lora-r
    assert isinstance(metrics[TRAIN_LOSS], float)
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert reply.metadata.message_type == "train"

    # Not a single string of the node's data is in the reply's records.
    texts = load_task("hwu64", "train").texts[:2000]
    flat = repr(content) + "".join(map(str, metrics.values()))
    assert not [text for text in texts if len(text) > 12 and text in flat]


def test_train_is_reproducible_and_takes_the_server_learning_rate(
    run_config: dict[str, Any], global_adapter: dict[str, torch.Tensor]
) -> None:
    node = context(run_config, **{"partition-id": 0})

    def trained(config: dict[str, Any]) -> dict[str, torch.Tensor]:
        reply = train(instruction(global_adapter, "train", config), node)
        return reply.content.array_records[ARRAYS].to_torch_state_dict()

    first = trained({"server-round": 2})
    again = trained({"server-round": 2})
    other_rate = trained({"server-round": 2, "learning-rate": 1e-2})
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other_rate[k]) for k in first)


@pytest.mark.parametrize("train_factors", ["ab", "b"])
def test_train_factors_b_replies_the_received_lora_a_bit_for_bit(
    run_config: dict[str, Any], global_adapter: dict[str, torch.Tensor], train_factors: str
) -> None:
    """FFA-LoRA (run-config train-factors = "b"): every lora_A comes back exactly as sent."""
    node = context({**run_config, "train-factors": train_factors}, **{"partition-id": 0})
    reply = train(instruction(global_adapter, "train", {SERVER_ROUND: 1}), node)
    received = reply.content.array_records[ARRAYS].to_torch_state_dict()
    assert list(received) == list(global_adapter)
    a_kept = [torch.equal(received[k], global_adapter[k]) for k in received if ".lora_A." in k]
    b_kept = [torch.equal(received[k], global_adapter[k]) for k in received if ".lora_B." in k]
    assert a_kept and b_kept
    assert not any(b_kept)
    assert all(a_kept) if train_factors == "b" else not any(a_kept)


def test_train_on_a_site_data_file(
    tmp_path: Path, run_config: dict[str, Any], global_adapter: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "site.jsonl"
    records = [{"text": f"secret record number {i}", "label": f"kind_{i % 3}"} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    node = context(run_config, **{"data-path": str(path)})
    reply = train(instruction(global_adapter, "train", {SERVER_ROUND: 1}), node)
    content = reply.content
    assert set(content.keys()) == {ARRAYS, METRICS}
    assert list(content.array_records[ARRAYS].keys()) == list(global_adapter)
    assert content.metric_records[METRICS][NUM_EXAMPLES] == 16  # train-examples of 27 kept
    assert "secret" not in repr(content)
    assert str(tmp_path) not in repr(content)

    evaluation = evaluate(instruction(global_adapter, "evaluate", {}), node)
    assert evaluation.content.metric_records[METRICS][NUM_EXAMPLES] == 3  # 10 % held out


def test_evaluate_replies_with_metrics_only(
    run_config: dict[str, Any], global_adapter: dict[str, torch.Tensor]
) -> None:
    msg = instruction(global_adapter, "evaluate", {SERVER_ROUND: 1})
    reply = app(msg, context(run_config, **{"partition-id": 0}))  # Routed by message type.
    assert set(reply.content.keys()) == {METRICS}
    metrics: MetricRecord = reply.content.metric_records[METRICS]
    assert set(metrics.keys()) == {NUM_EXAMPLES, EVAL_LOSS, EVAL_ACCURACY}
    assert metrics[NUM_EXAMPLES] == 12
    accuracy = metrics[EVAL_ACCURACY]
    assert isinstance(accuracy, float)
    assert 0.0 <= accuracy <= 1.0


def test_bad_instructions_fail_loudly(
    run_config: dict[str, Any], global_adapter: dict[str, torch.Tensor]
) -> None:
    node = context(run_config, **{"partition-id": 0})
    with pytest.raises(ValueError, match="server-round"):
        train(instruction(global_adapter, "train", {}), node)
    partial = dict(list(global_adapter.items())[1:])
    with pytest.raises(ValueError, match="lacks 1 of"):
        train(instruction(partial, "train", {SERVER_ROUND: 1}), node)
    with pytest.raises(ValueError, match=r"neither 'data-path'.*nor 'partition-id'"):
        train(instruction(global_adapter, "train", {"server-round": 1}), context(run_config))
    with pytest.raises(ValueError, match=r"'seen-tasks' has unknown name\(s\) \['trec'\]"):
        train(
            instruction(global_adapter, "train", {SERVER_ROUND: 1}),
            context({**run_config, "seen-tasks": "trec"}, **{"partition-id": 0}),
        )
    with pytest.raises(ValueError, match=r"run config key 'train-factors' must be one of ab, b"):
        train(
            instruction(global_adapter, "train", {SERVER_ROUND: 1}),
            context({**run_config, "train-factors": "a"}, **{"partition-id": 0}),
        )
    with pytest.raises(ValueError, match=r"train config key 'learning-rate'"):
        train(instruction(global_adapter, "train", {SERVER_ROUND: 1, "learning-rate": -1.0}), node)


def test_each_site_trains_its_own_rank_and_replies_with_it(tiny_model_dir: Path) -> None:
    """client-ranks "2,4": partition 0 trains rank 2, partition 1 rank 4 (the global's, the
    largest), node-config lora-r 3 overrides; each replies with its rank and tensors of it."""
    config = tiny_run_config(tiny_model_dir, **{"client-ranks": "2,4", "lora-r": 4})
    global_lora = LoraSettings.for_global(config)
    assert global_lora.r == 4
    adapter = initial_adapter(global_lora, seed=0)
    for node_config, rank in [
        ({"partition-id": 0}, 2),
        ({"partition-id": 1}, 4),
        ({"partition-id": 2}, 2),
        ({"partition-id": 1, "lora-r": 3}, 3),
    ]:
        reply = train(
            instruction(adapter, "train", {SERVER_ROUND: 1}), context(config, **node_config)
        )
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert reply.content.metric_records[METRICS][LORA_RANK] == rank
        arrays = reply.content.array_records[ARRAYS].to_torch_state_dict()
        assert list(arrays) == list(adapter)
        for key, tensor in arrays.items():
            global_shape = tuple(adapter[key].shape)
            expected = (rank, global_shape[1]) if ".lora_A." in key else (global_shape[0], rank)
            assert tuple(tensor.shape) == expected, (node_config, key)
        a_key = next(key for key in arrays if ".lora_A." in key)
        # Round 0 (B = 0): the site starts from the global's leading rows of A and trains them.
        assert not torch.equal(arrays[a_key], adapter[a_key][:rank])


def test_a_site_above_the_global_rank_fails_naming_the_keys(tiny_model_dir: Path) -> None:
    """The handler raises; Flower turns it into an error reply the server logs as the reason."""
    config = tiny_run_config(tiny_model_dir, **{"client-ranks": "2,4"})
    adapter = initial_adapter(LoraSettings.for_global(config), seed=0)
    with pytest.raises(ValueError, match=r"rank 8 \(node-config 'lora-r'.*'client-ranks'"):
        train(
            instruction(adapter, "train", {SERVER_ROUND: 1}),
            context(config, **{"partition-id": 0, "lora-r": 8}),
        )


def test_evaluate_scores_the_global_truncated_to_the_site_rank(tiny_model_dir: Path) -> None:
    config = tiny_run_config(tiny_model_dir, **{"client-ranks": "2,4", "eval-examples": 8})
    adapter = initial_adapter(LoraSettings.for_global(config), seed=0)
    reply = evaluate(
        instruction(adapter, "evaluate", {SERVER_ROUND: 1}), context(config, **{"partition-id": 0})
    )
    assert not reply.has_error()
    assert reply.content.metric_records[METRICS][NUM_EXAMPLES] > 0
